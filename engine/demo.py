"""`make demo`: runs faceveil's main job on an embedded default image and says where it wrote.

The default input is scikit-image's astronaut photograph (Eileen Collins, NASA, public domain),
which ships inside the scikit-image package, so the demo needs no network and no ../shared.
"""

from __future__ import annotations

from pathlib import Path

from faceveil.engine import detect_cli, image_io


def default_image():
    """Returns the embedded default photo as uint8 [512, 512, 3] (scikit-image's astronaut)."""
    from skimage import data

    return data.astronaut()


def run(out_dir: str) -> dict:
    """Returns the demo's report after writing its outputs into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "astronaut.png"
    image_io.write_image(src, default_image())
    report = detect_cli.run(str(src), output=str(out / "astronaut_faces.png"),
                            json_path=str(out / "astronaut_faces.json"))
    faces = report["images"][0]["faces"]
    print(f"demo: {len(faces)} face(s) on the astronaut photo")
    print(f"demo: annotated picture -> {out / 'astronaut_faces.png'}")
    print(f"demo: boxes and landmarks -> {out / 'astronaut_faces.json'}")
    return report
