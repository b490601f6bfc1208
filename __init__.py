"""faceveil: protects faces in photos and videos from face recognition, in JAX.

Subpackages: `faceveil.models` (Flax ports, weight store), `faceveil.losses` (pure objectives
and metrics), `faceveil.engine` (detection, alignment, optimisation loops, I/O, CLI).
"""

__version__ = "0.1.0"
