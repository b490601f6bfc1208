"""`faceveil check`: the attacker's view of photos (re-detect, embed, nearest reference).

dlib only (FaceNet is slow on CPU). A clean photo against the same person's other photos must be
reported NOT protected (exit 2), another person's photo protected (exit 0), bad inputs a
one-line error (exit 1).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from absl import flags

from faceveil.engine.commands import check
from faceveil.engine.pipeline import image_io


def _cli(*args: str) -> int:
    """Returns the exit status of `faceveil check ARGS` run in this process."""
    from faceveil.engine.commands import cli

    try:
        with pytest.raises(SystemExit) as e:
            cli.run(["faceveil", "check", *args])
    finally:
        flags.FLAGS.unparse_flags()  # the next call starts from the defaults again
    return e.value.code or 0


@pytest.fixture
def kit_refs(data_dir, tmp_path):
    """Returns a references folder with kit2.jpg and kit3.jpg (not kit1.jpg)."""
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("kit2.jpg", "kit3.jpg"):
        shutil.copy(data_dir / "faces" / "kit_harington" / name, refs / name)
    return refs


def test_own_clean_photo_is_not_protected(data_dir, kit_refs, tmp_path, capsys):
    kit1 = data_dir / "faces" / "kit_harington" / "kit1.jpg"
    res = check.check_photos([kit1], kit_refs, ["dlib"])
    (row,) = res.rows
    assert row.model == "dlib" and row.faces >= 1 and row.threshold == 0.6
    assert row.distance < 0.6 and not row.protected and not res.protected
    assert row.centroid_distance is not None and np.isfinite(row.centroid_distance)
    assert res.reference_faces == {"dlib": 2}
    assert "NOT PROTECTED" in check.format_table(res)

    png, js = tmp_path / "check.png", tmp_path / "check.json"
    assert _cli("--protected", str(kit1), "--references", str(kit_refs), "--model", "dlib",
                "--png", str(png), "--json", str(js)) == 2
    out = capsys.readouterr().out
    assert "kit1.jpg" in out and "NOT PROTECTED" in out
    report = json.loads(js.read_text())
    assert report["protected"] is False and report["rows"][0]["distance"] < 0.6
    assert image_io.read_image(png).shape[2] == 3


def test_another_person_is_protected_and_a_faceless_photo_says_so(data_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(data_dir / "faces" / "biden" / "biden1.jpg", photos / "biden1.jpg")
    image_io.write_image(photos / "blank.png", np.full((120, 160, 3), 128, np.uint8))
    js = tmp_path / "check.json"
    assert _cli("--protected", str(photos), "--references",
                str(data_dir / "faces" / "kit_harington"), "--json", str(js)) == 0
    out = capsys.readouterr().out
    assert check.NO_FACE in out and "NOT PROTECTED" not in out
    rows = {r["photo"].rsplit("/", 1)[-1]: r for r in json.loads(js.read_text())["rows"]}
    assert rows["biden1.jpg"]["distance"] > 0.6 and rows["biden1.jpg"]["protected"]
    assert rows["blank.png"]["faces"] == 0 and rows["blank.png"]["protected"]
    assert rows["blank.png"]["distance"] is None and rows["blank.png"]["note"] == check.NO_FACE


def test_missing_references_folder_is_an_input_error(data_dir, tmp_path, capsys):
    missing = tmp_path / "no_such_refs"
    kit1 = data_dir / "faces" / "kit_harington" / "kit1.jpg"
    with pytest.raises(image_io.InputError) as e:
        check.check_photos([kit1], missing, ["dlib"])
    assert e.value.path == missing and str(missing) in str(e.value)
    assert _cli("--protected", str(kit1), "--references", str(missing)) == 1
    err = capsys.readouterr().err
    assert err.startswith("faceveil check: error:") and str(missing) in err
    # so is a references folder without a photo, or without a photo with a face
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(image_io.InputError, match="no photo .* in this folder") as e:
        check.check_photos([kit1], empty, ["dlib"])
    assert e.value.path == empty
    image_io.write_image(empty / "blank.png", np.full((120, 160, 3), 128, np.uint8))
    with pytest.raises(image_io.InputError, match="no reference photo with a face") as e:
        check.check_photos([kit1], empty, ["dlib"])
    assert e.value.path == empty
