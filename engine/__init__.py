"""Optimisation loops, detection/alignment pipeline, image and video I/O, keys and CLI."""
