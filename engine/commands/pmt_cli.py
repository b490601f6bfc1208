"""`faceveil pmt`: the command-line layer over `faceveil.engine.pipeline.pmts`."""

from __future__ import annotations

from faceveil.engine.methods import pmt
from faceveil.engine.pipeline import image_io, pmts, recognise


def run(inputs, out: str, *, authorised: str, config: pmt.PmtConfig, upload: str,
        overwrite: bool) -> None:
    """Obfuscates every face of the photos for the authorised service; writes the outputs."""
    files = recognise.photo_files(inputs)
    if not files:
        raise image_io.InputError(", ".join(map(str, inputs)), "no photos (.jpg, .jpeg, .png)")
    images = [image_io.read_image(f) for f in files]  # every input checked before any work
    result = pmts.pmt_images(images, authorised=authorised, config=config,
                             names=[str(f) for f in files])
    found = result.photos.faces
    for i, f in enumerate(files):
        if not (found.image == i).any():
            small = int(result.photos.small_faces[i])
            why = f" ({small} too small)" if small else ""
            print(f"{f}: no face to obfuscate{why}")
    written = pmts.write_outputs(result, files, out, upload=upload, overwrite=overwrite)
    for j in range(len(found)):
        d = ", ".join(f"{v:.3f}" for v in result.authorised_distance[j])
        print(f"{files[found.image[j]]}: face {j}: authorised distance {d} "
              f"(threshold {result.photos.threshold})")
    print(f"{len(written)} file(s) -> {out}")
