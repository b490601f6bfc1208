"""`faceveil veil make|apply|recover`: the command-line layer over `faceveil.engine.pipeline.veils`.

The passphrase comes from --passphrase_file, the environment variable named by
--passphrase_env (default FACEVEIL_PASSPHRASE), or a prompt; never from the command line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from faceveil.engine import keyfile
from faceveil.engine.commands import report
from faceveil.engine.methods import veil as veil_core
from faceveil.engine.pipeline import image_io, veil_files, veils


def loss_curve_path(key: str | Path) -> Path:
    """Returns where `veil make` writes the loss curve: beside the key, `<key stem>.loss.png`."""
    key = Path(key)
    return key.with_name(key.stem + ".loss.png")


def write_loss_curve(result: veils.MakeResult, path, *, inputs=()) -> Path:
    """Returns the path of a PNG of the make's loss terms per iteration."""
    c = result.losses
    fig = Figure(figsize=(11, 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (name, v) in zip(axes, (("L_fea (feature-set distance)", c.fea),
                                    ("L_vis ||x - x'||", c.vis), ("L_var (block variance)", c.var))):
        ax.plot(np.arange(1, len(v) + 1), v)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
    fig.suptitle(f"veil make ({result.veil.model}, {len(result.person.files)} photos)",
                 fontsize=10)
    image_io.ensure_not_input(path, inputs)
    return report._save(fig, path)


def make(photos: str, key: str, *, model: str, count: int, config: veil_core.VeilConfig,
         passphrase_env: str | None, passphrase_file: str | None, overwrite: bool) -> None:
    """Makes a person's veil from a folder of their photos and writes the encrypted key."""
    key_path = Path(key)
    if key_path.exists() and not overwrite:
        raise image_io.OutputError(key_path, "exists; pass --overwrite to replace it")
    if not Path(photos).is_dir():
        raise image_io.InputError(photos, "--photos must be a folder of one person's photos")
    # The passphrase is asked first: a long make must not end at a prompt nobody answers.
    passphrase = keyfile.read_passphrase(env=passphrase_env, file=passphrase_file, confirm=True)
    result = veils.make_veil(photos, model=model, count=count, config=config)
    result.veil.save(key_path, passphrase, overwrite=overwrite)
    curve = write_loss_curve(result, loss_curve_path(key_path))
    print(f"veil of {len(result.person.files)} photo(s) against {model}: "
          f"{result.seconds:.1f} s, final feature distance {float(result.losses.fea[-1]):.4f}")
    print(f"key -> {key_path}\nloss curve -> {curve}")


def _load(key: str, passphrase_env, passphrase_file, model: str | None) -> veils.Veil:
    passphrase = keyfile.read_passphrase(env=passphrase_env, file=passphrase_file)
    veil = veils.Veil.load(key, passphrase)
    if model and model != veil.model:
        raise keyfile.KeyFileError(key, f"was made for model {veil.model}, not {model}")
    return veil


def apply(inputs, out: str, *, key: str, passphrase_env, passphrase_file, model: str | None,
          overwrite: bool) -> None:
    """Veils the key's person in photos and videos (outputs and sidecars under `out`)."""
    veil = _load(key, passphrase_env, passphrase_file, model)
    for r in veil_files.veil_files(inputs, out, veil, overwrite=overwrite):
        others = f", {r.others} other face(s) left alone" if r.others else ""
        print(f"{r.source} -> {r.output}: {r.faces} face(s) veiled{others}")


def recover(inputs, out: str, *, key: str, passphrase_env, passphrase_file, model: str | None,
            overwrite: bool) -> None:
    """Removes the veil from files this key veiled (outputs under `out`)."""
    veil = _load(key, passphrase_env, passphrase_file, model)
    for r in veil_files.recover_files(inputs, out, veil, overwrite=overwrite):
        print(f"{r.source} -> {r.output}: {r.faces} face(s) recovered")
