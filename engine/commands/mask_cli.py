"""`faceveil mask train|protect|restore`: the command-line layer over `faceveil.engine.pipeline.masks`.

The passphrase comes from --passphrase_file, the environment variable named by
--passphrase_env (default FACEVEIL_PASSPHRASE), or a prompt; never from the command line.
"""

from __future__ import annotations

from faceveil.engine import keyfile
from faceveil.engine.methods import mask
from faceveil.engine.pipeline import mask_files, mask_training


def protect(inputs, out: str, keys: str, *, recognisers: str, config: mask.MaskConfig,
            passphrase_env: str | None, passphrase_file: str | None, overwrite: bool,
            model_dir: str | None = None) -> None:
    """Protects every face of the photos with XOR keys, per-image or from the trained model in
    `model_dir` (PNGs under `out`, keys under `keys`); prints each face's distance and SSIM."""
    mask_files.check_png_output(out)
    model = None
    if model_dir is not None:
        model = mask_training.MaskModel.load(model_dir)
        model.rows(recognisers)  # a model trained for other recognisers fails before the prompt
    # The passphrase is asked first: a long run must not end at a prompt nobody answers.
    passphrase = keyfile.read_passphrase(env=passphrase_env, file=passphrase_file, confirm=True)
    for r in mask_files.protect_files(inputs, out, keys, passphrase=passphrase,
                                      recognisers=recognisers, config=config,
                                      overwrite=overwrite, model=model):
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


def train(faces: str, recognisers: str, out: str, *, steps: int | None) -> None:
    """Trains a mask model (template network and key generator) on the faces under `faces`."""
    from faceveil.models import registry

    names = tuple(r.name for r in registry.members(registry.get(recognisers)))
    cfg = mask_training.MaskTrainConfig(
        **({} if steps is None else {"generator_steps": steps}))
    model = mask_training.train([faces], names, out=out, config=cfg)
    print(f"mask model for {','.join(names)} written to {out} (template steps "
          f"{model.template_step}, generator steps {model.generator_step})")
