"""`faceveil attack KIND`: each kind on a tiny set, and bad inputs (exit 1, nothing written).

The set: three originals of two people (tests/data: obama1, obama2, biden2) and, as the
"protected" files, copies with a little Gaussian noise (`<stem>_cloaked.png`, the way `cloak`
names its output): every recogniser still knows them, so the numbers are easy to predict. dlib
only, at cut 1, few iterations, a width-2 decoder: the machinery is checked, not the attacks.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from faceveil.engine.attacks import decoder, paired
from faceveil.engine.methods import pmt
from faceveil.engine.pipeline import image_io, recognise

FACES = (("obama", "obama1.jpg"), ("obama", "obama2.jpg"), ("biden", "biden2.jpg"))
JSON_KEYS = {"kind", "title", "rows", "notes", "original", "protected"}


def _attack(*args) -> int:
    """Returns the exit status of `faceveil attack ARGS` run in this process."""
    from faceveil.engine.commands import cli

    try:
        with pytest.raises(SystemExit) as e:
            cli.run(["faceveil", "attack", *map(str, args)])
    finally:
        flags.FLAGS.unparse_flags()  # the next call starts from the defaults again
    return e.value.code or 0


@pytest.fixture(scope="module")
def attack_set(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Returns {"original": folder of identity folders, "protected": noisy copies, "root"}."""
    root = tmp_path_factory.mktemp("attack_set")
    orig, prot = root / "original", root / "protected"
    prot.mkdir()
    rng = np.random.default_rng(0)
    for who, name in FACES:
        (orig / who).mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / "faces" / who / name, orig / who / name)
        img = image_io.read_image(data_dir / "faces" / who / name).astype(np.float32)
        noisy = np.clip(img + rng.normal(0.0, 6.0, img.shape), 0, 255).astype(np.uint8)
        image_io.write_image(prot / f"{Path(name).stem}_cloaked.png", noisy)
    return {"original": orig, "protected": prot, "root": root}


def _run(kind: str, attack_set, tmp_path, *extra) -> dict:
    """Returns the JSON `faceveil attack kind` writes on the set (asserting exit 0)."""
    out = tmp_path / f"{kind}.json"
    assert _attack(kind, "--original", attack_set["original"], "--protected",
                   attack_set["protected"], "--model", "dlib", "--json", out, *extra) == 0
    report = json.loads(out.read_text())
    assert JSON_KEYS <= set(report) and report["kind"] == kind
    assert report["original"] == [str(attack_set["original"])]
    return report


def test_data_abuse_and_recognise(attack_set, tmp_path, capsys):
    report = _run("data-abuse", attack_set, tmp_path)
    (row,) = report["rows"]
    assert row["model"] == "dlib" and row["faces"] == 3 and row["accuracy"] == 1.0
    assert row["pairs"] == 1  # obama1-obama2, counted once
    assert row["clean"] == 1.0 and row["cross"] == 1.0 and row["mean_cosine"] > 0.8
    assert report["kappa"] == 0.2 and len(report["per_face"]["dlib"]) == 3
    assert all(f["cosine"] > 0.8 for f in report["per_face"]["dlib"])
    out = capsys.readouterr().out
    assert "Data abuse" in out and "json ->" in out

    report = _run("recognise", attack_set, tmp_path)
    assert len(report["rows"]) == 3
    for r in report["rows"]:  # a little noise protects nobody
        assert r["faces"] == 1 and r["own"] < 0.6 and r["protected"] is False
    others = {r["photo"]: r["others"] for r in report["rows"]}
    assert others["biden2_cloaked.png"] is None and others["obama1_cloaked.png"] is not None
    assert report["summary"]["dlib"]["protected_vs_own"] == 0.0


def test_attributes_and_up(attack_set, tmp_path):
    report = _run("attributes", attack_set, tmp_path)
    assert [r["photo"] for r in report["rows"]][-1] == "mean" and len(report["rows"]) == 4
    s = report["summary"]
    assert s["faces"] == 3 and s["gender_agreement"] == 1.0 and s["mean_cosine"] > 0.9
    assert len(report["per_face"]) == 3 and all(r["male_original"] for r in report["rows"][:3])

    png = tmp_path / "up.png"
    report = _run("up", attack_set, tmp_path, "--sigmas", "0,0.005,0.5", "--png", png)
    assert [r["sigma"] for r in report["rows"]] == [0.0, 0.005, 0.5]
    ups = [c["up"] for c in report["curve"]]
    assert ups[0] == 1.0 and ups[-1] == 0.0 and ups == sorted(ups, reverse=True)
    assert report["model"] == "dlib" and report["faces"] == 3 and report["useful"] == 1.0
    assert all(0.0 < p < 0.5 for p in report["privacy"])
    assert image_io.read_image(png).shape[2] == 3


@pytest.fixture(scope="module")
def upload_set(attack_set) -> Path:
    """Returns a folder with obama1's noisy photo and biden2's clean cut-1 features (.npz)."""
    prot = attack_set["root"] / "with_upload"
    prot.mkdir()
    shutil.copy(attack_set["protected"] / "obama1_cloaked.png", prot / "obama1_cloaked.png")
    img = image_io.read_image(attack_set["original"] / "biden" / "biden2.jpg")
    _, lms, _ = recognise.largest_face(img)
    chip = recognise.embed_faces(img, lms[None], "dlib")[1]
    rec, params = recognise.recogniser_params("dlib")
    np.savez(prot / "biden2.features.npz", layers=np.asarray(1),
             dlib_face0=np.asarray(pmt.cut_features(rec, params, chip, 1))[0])
    return prot


def test_whitebox_on_photos_and_feature_uploads(attack_set, upload_set, tmp_path):
    out, png = tmp_path / "whitebox.json", tmp_path / "whitebox.png"
    assert _attack("whitebox", "--original", attack_set["original"], "--protected", upload_set,
                   "--model", "dlib", "--layers", "1", "--iters", "2", "--json", out,
                   "--png", png) == 0
    report = json.loads(out.read_text())
    assert [r["features"] for r in report["rows"]] == ["unprotected", "protected"]
    assert all(r["faces"] == 2 and 0 <= r["srra"] <= 1 for r in report["rows"])
    assert (report["model"], report["layers"], report["iters"]) == ("dlib", 1, 2)
    per = {k: {Path(f["protected"]).name: f for f in v} for k, v in report["per_face"].items()}
    # The upload holds biden2's clean features: its reconstruction is the unprotected one.
    up_, clean = per["protected"]["biden2.features.npz"], per["unprotected"]["biden2.features.npz"]
    assert up_["ssim"] == pytest.approx(clean["ssim"], abs=1e-5)
    assert image_io.read_image(png).shape[2] == 3


def test_feature_uploads_are_refused_where_they_do_not_fit(attack_set, upload_set, tmp_path,
                                                           capsys):
    out = tmp_path / "out.json"
    base = ("--original", attack_set["original"], "--protected", upload_set, "--json", out)
    assert _attack("whitebox", *base, "--layers", "2", "--iters", "1") == 1
    err = capsys.readouterr().err
    assert "biden2.features.npz" in err and "cut after 1 layer(s), not --layers 2" in err
    assert _attack("attributes", *base) == 1
    assert "biden2.features.npz: a feature upload has no image" in capsys.readouterr().err
    assert not out.exists()


def test_blackbox_resumes_its_decoder_and_reports(attack_set, data_dir, tmp_path, capsys):
    train = data_dir / "faces" / "kit_harington"  # other people than the attacked ones
    dec_dir = tmp_path / "decoder"
    chips, _ = decoder.face_chips(recognise.photo_files([train]), "dlib")
    cfg = decoder.DecoderConfig(width=2, steps=1, batch=1)
    decoder.train("dlib", chips, 1, cfg, checkpoint_dir=dec_dir)
    capsys.readouterr()

    out, png = tmp_path / "blackbox.json", tmp_path / "blackbox.png"
    assert _attack("blackbox", "--original", attack_set["original"], "--protected",
                   attack_set["protected"], "--model", "dlib", "--layers", "1", "--decoder",
                   dec_dir, "--train-faces", train, "--iters", "2", "--json", out,
                   "--png", png) == 0
    assert "resuming from" in capsys.readouterr().err
    trained = decoder.Decoder.load(dec_dir)
    assert trained.step == 2 and trained.config == dataclasses.replace(cfg, steps=2)
    report = json.loads(out.read_text())
    assert [r["features"] for r in report["rows"]] == ["unprotected", "protected"]
    assert all(r["faces"] == 3 for r in report["rows"]) and report["layers"] == 1
    assert image_io.read_image(png).shape[2] == 3

    # The decoder is for cut 1: --layers 2 is refused, naming the folder.
    base = ("--original", attack_set["original"], "--protected", attack_set["protected"],
            "--json", tmp_path / "again.json")
    assert _attack("blackbox", *base, "--decoder", dec_dir, "--layers", "2") == 1
    err = capsys.readouterr().err
    assert str(dec_dir) in err and "after 1 layer(s), not --model dlib --layers 2" in err
    assert _attack("blackbox", *base, "--decoder", tmp_path / "empty") == 1
    assert "no trained decoder here" in capsys.readouterr().err
    assert not (tmp_path / "again.json").exists()


def test_recognise_on_a_video(data_dir, tmp_path):
    clip, out = data_dir / "video" / "hamilton_clip.mp4", tmp_path / "video.json"
    # The clean clip as its own "cloaked" version: whatever is judged is not protected.
    assert _attack("recognise", "--original", clip, "--protected", clip, "--frames", "4",
                   "--model", "dlib", "--json", out) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "recognise" and report["frames"] == 4
    (row,) = report["rows"]
    assert row["model"] == "dlib" and row["faces"] >= 1 and row["missed"] == 0
    judged = [row[r] for r in ("centroid", "nearest_frame", "photo") if row[r] is not None]
    assert all(v == 0.0 for v in judged)
    assert row["all"] == (0.0 if judged else None)


def _bad_cases(s: dict[str, Path]) -> list[tuple[tuple, str]]:
    o, p = ("--original", s["original"]), ("--protected", s["protected"])
    return [
        (("nosuch", *o, *p), "attack needs one kind"),
        (("up", *p), "needs --original"),
        (("up", "--original", s["original"], "--protected", s["stray"]),
         f"{s['stray'] / 'stranger.png'}: no original photo of the same stem"),
        (("whitebox", *o, *p, "--layers", "9"), "--layers: cut 9"),
        (("data-abuse", *o, *p, "--model", "nosuch"), "--model: unknown recogniser 'nosuch'"),
        (("up", *o, *p, "--model", "dlib,facenet"), "takes one recogniser"),
        (("attributes", *o, *p, "--png", s["root"] / "x.png"), "draws no chart"),
        (("blackbox", *o, *p), "needs --decoder"),
        (("up", *o, *p, "--sigmas", "a,b"), "--sigmas"),
        (("recognise", "--original", s["root"] / "clean.mp4", *p), "videos are judged by"),
        (("up", "--original", s["root"] / "missing", *p), "missing: no such file or folder"),
    ]


def test_bad_inputs_exit_1_and_write_nothing(attack_set, tmp_path, capsys):
    stray = tmp_path / "stray"
    stray.mkdir()
    shutil.copy(attack_set["protected"] / "obama1_cloaked.png", stray / "obama1_cloaked.png")
    shutil.copy(attack_set["protected"] / "obama2_cloaked.png", stray / "stranger.png")
    cases = _bad_cases({**attack_set, "stray": stray})
    out = tmp_path / "out.json"
    for args, message in cases:
        assert _attack(*args, "--json", out) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("faceveil attack: error:") and message in err, (args, err)
        assert not out.exists(), args

    # An output that would overwrite an input is refused; the input is left as it was.
    victim = attack_set["protected"] / "biden2_cloaked.png"
    before = victim.read_bytes()
    assert _attack("up", "--original", attack_set["original"], "--protected",
                   attack_set["protected"], "--png", victim) == 1
    assert str(victim) in capsys.readouterr().err and victim.read_bytes() == before


def test_pairing_and_faces_for_the_cli(attack_set):
    pairs = paired.pair_files([attack_set["original"]], [attack_set["protected"]])
    faces = paired.load_faces(pairs)
    assert len(faces) == 3 and [p.identity for p in pairs] == ["biden", "obama", "obama"]
    emb, chips = faces.protected_chips("dlib", "test")
    assert emb.shape == (3, 128) and chips.shape == (3, 150, 150, 3)
    np.testing.assert_array_equal(faces.protected_landmarks, faces.landmarks)
    detected = paired.load_faces(pairs, align="detect")
    # The attacker's own detection of the noisy copy lands within a few pixels.
    np.testing.assert_allclose(detected.protected_landmarks, faces.landmarks, atol=8.0)
    with pytest.raises(ValueError, match="align"):
        paired.load_faces(pairs, align="nose")
