"""`faceveil mask protect|restore`: the command-line layer over `faceveil.engine.pipeline.masks`.

The passphrase comes from --passphrase_file, the environment variable named by
--passphrase_env (default FACEVEIL_PASSPHRASE), or a prompt; never from the command line.
"""

from __future__ import annotations

from faceveil.engine import keyfile
from faceveil.engine.methods import mask
from faceveil.engine.pipeline import mask_files


def protect(inputs, out: str, keys: str, *, recognisers: str, config: mask.MaskConfig,
            passphrase_env: str | None, passphrase_file: str | None, overwrite: bool) -> None:
    """Protects every face of the photos with per-image XOR keys (PNGs under `out`, keys under
    `keys`) and prints each face's distance and SSIM."""
    mask_files.check_png_output(out)
    # The passphrase is asked first: a long run must not end at a prompt nobody answers.
    passphrase = keyfile.read_passphrase(env=passphrase_env, file=passphrase_file, confirm=True)
    for r in mask_files.protect_files(inputs, out, keys, passphrase=passphrase,
                                      recognisers=recognisers, config=config,
                                      overwrite=overwrite):
        dist = ", ".join(f"{name} {d}" for name, d in r.distances.items())
        print(f"{r.source} -> {r.output} (key {r.key}): {r.faces} face(s); distance "
              f"clean vs protected: {dist or '-'}; SSIM {r.ssim or '-'}")


def restore(inputs, keys: str, out: str, *, passphrase_env: str | None,
            passphrase_file: str | None, overwrite: bool) -> None:
    """Restores protected photos bit for bit with their keys (outputs under `out`)."""
    mask_files.check_png_output(out)
    passphrase = keyfile.read_passphrase(env=passphrase_env, file=passphrase_file)
    for r in mask_files.restore_files(inputs, keys, out, passphrase=passphrase,
                                      overwrite=overwrite):
        print(f"{r.source} -> {r.output}: restored ({r.faces} face(s), key {r.key})")
