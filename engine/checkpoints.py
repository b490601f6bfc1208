"""Training checkpoints: one .npz file per run, written atomically, checked when read.

A checkpoint holds a JSON `meta` record (its format name, what it was trained on, the step(s),
the PRNG key, the config) and named parameter trees (`store.flatten`: "net/conv0/kernel", ...),
and while training the optimiser states' leaves ("opt/<name>/00000", ...). Used by the
black-box decoder (`faceveil.engine.attacks.decoder`) and the mask template and key generator
(`faceveil.engine.pipeline.mask_training`): each says what its file must contain, this module
reads, writes and validates it.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from faceveil.engine.pipeline import image_io
from faceveil.models import store


def checkpoint_file(path, name: str) -> Path:
    """Returns the checkpoint file of a folder (`name` in it), or `path` itself if a .npz."""
    path = Path(path)
    return path if path.suffix == ".npz" else path / name


def key_data(key) -> np.ndarray:
    """Returns the raw uint32 data of a PRNG key (typed or raw)."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, np.uint32)


def mismatch(saved: dict, want: dict, fields: tuple[str, ...],
             cadence_fields: tuple[str, ...] = ()) -> str | None:
    """Returns why a saved training run is not the wanted one (None: it is).

    `fields` of the two meta records must be equal, and so must their "config" records but
    for `cadence_fields` (settings that do not change what a step computes: a run of 500
    steps may be continued to 1000).
    """
    for field in fields:
        if saved.get(field) != want.get(field):
            return f"its {field} differs ({saved.get(field)} vs {want.get(field)})"
    a, b = dict(saved.get("config", {})), dict(want.get("config", {}))
    for field in cadence_fields:
        a.pop(field, None)
        b.pop(field, None)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"its config differs in {', '.join(diff)}"
    return None


def write(file: Path, meta: dict, trees: dict, opt_states: dict | None = None) -> None:
    """Writes one checkpoint file atomically (a temporary name, then a rename).

    Args:
      file: the .npz path.
      meta: JSON-able record.
      trees: name -> nested dict of arrays (parameters, statistics).
      opt_states: name -> optimiser state (any pytree), saved as its leaves.
    """
    arrays = {"meta": np.asarray(json.dumps(meta))}
    for name, tree in trees.items():
        arrays.update(store.flatten(jax.device_get(tree), name))
    for name, state in (opt_states or {}).items():
        leaves = jax.tree_util.tree_leaves(jax.device_get(state))
        arrays.update({f"opt/{name}/{i:05d}": np.asarray(v) for i, v in enumerate(leaves)})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.atomic_write_bytes(file, buf.getvalue())


def read(file: Path, fmt: str, what: str) -> tuple[dict, dict, dict]:
    """Returns (meta, trees, optimiser leaves by name) of a checkpoint file of format `fmt`.

    Raises:
      FileNotFoundError: no such file.
      image_io.InputError: (a ValueError naming the file) unreadable, or of another format.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no {what} there")
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise image_io.InputError(file, f"not a {what} ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise image_io.InputError(file, f"not a {what} (format {got!r}, expected {fmt!r})")
    opt: dict = {}
    for k in sorted(k for k in arrays if k.startswith("opt/")):
        opt.setdefault(k.split("/")[1], []).append(arrays.pop(k))
    return meta, store.unflatten(arrays), opt


def check_like(got, want, where: str) -> None:
    """Raises ValueError unless nested dict `got` has exactly the shapes of `want`."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            raise ValueError(f"{where}: parameters {sorted(got or {})} vs {sorted(want)}")
        for k in want:
            check_like(got[k], want[k], f"{where}/{k}")
    elif getattr(got, "shape", None) != want.shape:
        raise ValueError(f"{where}: shape {getattr(got, 'shape', None)}, expected {want.shape}")


def opt_state(opt, params, leaves: list, file: Path, what: str):
    """Returns the optimiser state of `opt` over `params` rebuilt from its saved leaves."""
    fresh = opt.init(params)
    want, treedef = jax.tree_util.tree_flatten(fresh)
    if len(leaves) != len(want) or any(np.shape(a) != np.shape(b) for a, b in zip(leaves, want)):
        raise image_io.InputError(file, f"its optimiser state does not fit the {what}")
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(v, jnp.asarray(w).dtype) for v, w in zip(leaves, want)])
