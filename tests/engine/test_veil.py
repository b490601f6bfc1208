"""Person-specific veils: the compiled core, key files, person checks, and the CLI end to end.

CPU-sized: the veil is made with 25 MI-FGSM iterations (its strength is measured by
benchmarks/veil.py, not here). The CLI flow (make, apply, recover) runs once per module.

The video's large face (frames ~20-46) is Alex Lacamoire: dlib puts it 0.53-0.73 from
faces/lin_manuel_miranda/lmm1.png (threshold 0.6) and ~0.56 from faces/alex_lacamoire/alex2.png;
Lin-Manuel Miranda is only the small (< 40 px) face of frames 0-18. So the person folder is
alex2.png plus two frames of the video.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from faceveil import losses
from faceveil.engine import keyfile
from faceveil.engine.methods import veil as veil_core
from faceveil.engine.pipeline import faces, image_io, recognise, veil_files, veils, video_io
from faceveil.models import registry

PW = "correct horse battery"
ALPHA = 0.2
ITERS = 25
PERSON_FRAMES = (20, 33)  # frames of the video with one face, that of Alex Lacamoire


def _tol(alpha: float) -> int:
    """Levels a recovered pixel may be off: uint8 rounding of x' amplified by 1 / alpha."""
    return math.ceil(0.5 / alpha) + 1


# ----------------------------------------------------------------------------------------------
# The compiled core


def _rotation(deg: float, scale: float, centre_chip, centre_patch) -> np.ndarray:
    """Returns (2, 3) chip -> patch: rotate by `deg` and scale about the chip's centre."""
    a = np.deg2rad(deg)
    lin = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    t = np.asarray(centre_patch, float) - lin @ np.asarray(centre_chip, float)
    return np.concatenate([lin, t[:, None]], axis=1)


def _bilinear(img: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Returns img [H, W, C] sampled bilinearly at (xs, ys) (float64; 0 outside)."""
    h, w = img.shape[:2]
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]

    def tap(yi, xi):
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        return np.where(ok[..., None], img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], 0.0)

    top = tap(y0, x0) * (1 - fx) + tap(y0, x0 + 1) * fx
    bottom = tap(y0 + 1, x0) * (1 - fx) + tap(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def test_blend_patch_apply_then_recover():
    rng = np.random.default_rng(0)
    p, s = 96, 48
    patch = rng.integers(0, 256, (p, p, 3), dtype=np.uint8)
    veil = rng.uniform(0, 1, (s, s, 3)).astype(np.float32)
    m_chip = _rotation(25.0, 1.3, ((s - 1) / 2, (s - 1) / 2), (p / 2 - 3, p / 2 + 2))

    out, inside = veil_core.blend_patch(patch, m_chip, veil, ALPHA)
    out, inside = np.asarray(out), np.asarray(inside)
    assert out.dtype == np.uint8 and out.shape == patch.shape and inside.shape == (p, p)
    assert 0.2 < inside.mean() < 0.9  # a rotated footprint inside the patch, with a margin

    # The footprint, computed independently (float64): chip coordinates of every patch pixel.
    inv = np.linalg.inv(np.vstack([m_chip, [0, 0, 1]]))[:2]
    v, u = np.meshgrid(np.arange(p, dtype=float), np.arange(p, dtype=float), indexing="ij")
    xs = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    ys = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    want_inside = (xs >= 0) & (xs <= s - 1) & (ys >= 0) & (ys <= s - 1)
    edge = np.minimum.reduce([np.abs(xs), np.abs(xs - (s - 1)), np.abs(ys), np.abs(ys - (s - 1))])
    clear = edge > 1e-3  # float32 may classify a pixel on the very edge either way
    np.testing.assert_array_equal(inside[clear], want_inside[clear])

    # Outside the footprint: bit-identical.
    np.testing.assert_array_equal(out[~inside], patch[~inside])
    # Inside: round(alpha x + (1 - alpha) veil(warp)), up to float32 rounding ties.
    x = patch.astype(np.float64) / 255.0
    want = np.round((ALPHA * x + (1 - ALPHA) * _bilinear(veil.astype(np.float64), xs, ys)) * 255)
    diff = np.abs(out.astype(int) - want.astype(int))[inside]
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # The face is hidden: far from the original inside the footprint.
    assert np.abs(out.astype(int) - patch)[inside].mean() > 40

    rec, rec_inside = veil_core.blend_patch(out, m_chip, veil, ALPHA, recover=True, sigma=0.0)
    rec = np.asarray(rec)
    np.testing.assert_array_equal(np.asarray(rec_inside), inside)
    np.testing.assert_array_equal(rec[~inside], patch[~inside])
    err = np.abs(rec.astype(int) - patch)[inside]
    assert err.max() <= _tol(ALPHA), err.max()
    assert err.mean() < 2.0


@pytest.fixture(scope="module")
def obama(data_dir):
    """Returns the PersonFaces of tests/data/faces/obama (3 photos)."""
    return veils.person_faces([data_dir / "faces" / "obama"], "dlib")


def test_make_steps_lowers_feature_distance_and_compiles_once(obama):
    rec, params = recognise.recogniser_params("dlib")
    # A config no other test uses, so this test sees the compiled function's first call.
    cfg = veil_core.VeilConfig(iters=8, lam=0.0123)
    steps = 8
    fn = veil_core.make_steps(rec, cfg, steps)
    assert veil_core.make_steps(rec, cfg, steps) is fn  # cached per (model, config, steps)
    state = veil_core.init_veil(jax.random.PRNGKey(0), rec.chip_size, cfg)
    chips, basis = obama.chips, obama.embeddings
    assert chips.shape == (3, rec.chip_size, rec.chip_size, 3)
    weights = np.ones(len(chips), np.float32)

    before = fn._cache_size()
    state, terms = fn(params, state, chips, basis, weights)
    after_first = fn._cache_size()
    state2, terms2 = fn(params, state, chips, basis, weights)
    jax.block_until_ready(state2.veil)
    assert after_first == before + 1
    assert fn._cache_size() == after_first  # same shapes: no recompilation

    for t in (terms, terms2):
        assert all(np.asarray(v).shape == (steps,) for v in t)
        assert all(np.isfinite(np.asarray(v)).all() for v in t)
    fea = np.concatenate([np.asarray(terms.fea), np.asarray(terms2.fea)])
    assert fea[-1] < fea[0], fea
    veil = np.asarray(state2.veil)
    assert veil.shape == (rec.chip_size, rec.chip_size, 3)
    assert veil.min() >= 0.0 and veil.max() <= 1.0


# ----------------------------------------------------------------------------------------------
# Key files


def test_veil_save_load_round_trip(tmp_path, monkeypatch):
    # write_key binds n=SCRYPT_N at definition: pass a cheap cost through instead.
    monkeypatch.setattr(keyfile, "write_key", functools.partial(keyfile.write_key, n=2**10))
    rec = registry.get("dlib")
    rng = np.random.default_rng(1)
    cfg = veil_core.preset("vuap", alpha=0.3, iters=7, recover_sigma=0.5)
    made = veils.Veil(veil=rng.uniform(0, 1, (rec.chip_size,) * 2 + (3,)).astype(np.float32),
                      config=cfg, model=rec.name,
                      template=np.asarray(rec.template, np.float32), seed=(1 << 61) + 12345,
                      identity=rng.normal(size=(3, 128)).astype(np.float32),
                      key_id="ab" * 16)
    path = made.save(tmp_path / "k.veil", PW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header = json.loads(path.read_bytes()[10:10 + int.from_bytes(path.read_bytes()[6:10], "big")])
    assert header["kind"] == "veil" and header["kdf"]["n"] == 2**10

    got = veils.Veil.load(path, PW)
    assert got.config == cfg and got.model == made.model
    assert got.seed == made.seed and got.key_id == made.key_id
    for name in ("veil", "identity", "template"):
        a, b = getattr(got, name), getattr(made, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)

    with pytest.raises(keyfile.KeyFileError, match="wrong passphrase"):
        veils.Veil.load(path, PW + "!")
    with pytest.raises(keyfile.KeyFileError, match="exists"):
        made.save(path, PW)


# ----------------------------------------------------------------------------------------------
# The person's photos


def test_person_faces_refuses_a_photo_without_a_face(tmp_path, data_dir):
    shutil.copy(data_dir / "faces" / "obama" / "obama1.jpg", tmp_path / "a_obama.jpg")
    image_io.write_image(tmp_path / "b_grey.png", np.full((200, 240, 3), 128, np.uint8))
    with pytest.raises(image_io.InputError) as e:
        veils.person_faces([tmp_path], "dlib")
    assert e.value.path == tmp_path / "b_grey.png"
    assert "b_grey.png" in str(e.value) and "no face" in str(e.value)


@pytest.mark.parametrize("obamas", [["obama1.jpg"], ["obama1.jpg", "obama2.jpg"]])
def test_person_faces_refuses_two_people(tmp_path, data_dir, obamas):
    for name in obamas:
        shutil.copy(data_dir / "faces" / "obama" / name, tmp_path / name)
    shutil.copy(data_dir / "faces" / "biden" / "biden2.jpg", tmp_path / "biden2.jpg")
    with pytest.raises(image_io.InputError, match="different person"):
        veils.person_faces([tmp_path], "dlib")
    if len(obamas) > 1:  # with three photos, the odd one out is named
        with pytest.raises(image_io.InputError) as e:
            veils.person_faces([tmp_path], "dlib")
        assert e.value.path.name == "biden2.jpg"


# ----------------------------------------------------------------------------------------------
# The command line, end to end


def _faceveil(*args, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    # Only the passphrase a test gives: never one from the caller's environment.
    full = {k: v for k, v in os.environ.items() if k != "FACEVEIL_PASSPHRASE"}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "faceveil.engine.commands.cli", *map(str, args)],
                          capture_output=True, text=True, env=full, cwd=cwd, timeout=600,
                          check=False)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


ENV = {"FACEVEIL_PASSPHRASE": PW}


@pytest.fixture(scope="module")
def flow(tmp_path_factory, data_dir):
    """Runs `veil make`, `veil apply` (a photo and the video) and `veil recover` once."""
    root = tmp_path_factory.mktemp("veil_cli")
    person = root / "person"
    person.mkdir()
    photo = data_dir / "faces" / "alex_lacamoire" / "alex2.png"
    shutil.copy(photo, person / photo.name)
    video = data_dir / "video" / "hamilton_clip.mp4"
    frames = video_io.read_video(video, limit=max(PERSON_FRAMES) + 1)
    for t in PERSON_FRAMES:
        assert len(faces.find_photo_faces(frames[t]).boxes) == 1, f"frame {t}: not one face"
        image_io.write_image(person / f"frame{t:02d}.png", frames[t])
    pw_file = root / "pass.txt"
    pw_file.write_text(PW + "\n")

    key = root / "keys" / "alex.veil"
    make = _ok(_faceveil("veil", "make", "--photos", person, "--key", key, "--iters", ITERS,
                         "--passphrase_file", pw_file))
    out, rec = root / "out", root / "rec"
    apply = _ok(_faceveil("veil", "apply", photo, video, "--key", key, "--out", out, env=ENV))
    recover = _ok(_faceveil("veil", "recover", out / "alex2.png", out / "hamilton_clip.mp4",
                            "--key", key, "--out", rec, env=ENV))
    return types.SimpleNamespace(root=root, key=key, photo=photo, video=video, out=out, rec=rec,
                                 make=make, apply=apply, recover=recover)


def _side(path) -> dict:
    return json.loads(veil_files.sidecar_path(path).read_text())


def _chips(image: np.ndarray, landmarks) -> np.ndarray:
    return recognise.embed_faces(image, np.asarray(landmarks, np.float32).reshape(-1, 5, 2))[1]


def test_cli_make_writes_private_key_and_loss_curve(flow):
    assert stat.S_IMODE(flow.key.stat().st_mode) == 0o600
    curve = flow.key.with_name("alex.loss.png")
    assert curve.is_file() and image_io.read_image(curve).shape[2] == 3
    assert "final feature distance" in flow.make.stdout
    veil = veils.Veil.load(flow.key, PW)
    assert veil.model == "dlib" and veil.config.iters == ITERS and veil.config.alpha == ALPHA
    assert veil.identity.shape[0] == 1 + len(PERSON_FRAMES)
    assert veil.veil.shape == (150, 150, 3)
    assert PW not in flow.key.read_bytes().decode("latin-1")


def test_cli_apply_writes_outputs_and_sidecars(flow):
    key_id = veils.Veil.load(flow.key, PW).key_id
    out_photo, out_video = flow.out / "alex2.png", flow.out / "hamilton_clip.mp4"
    for out in (out_photo, out_video):
        assert out.is_file() and veil_files.sidecar_path(out).is_file()
        side = _side(out)
        assert side["key_id"] == key_id and side["model"] == "dlib"
        assert side["output_sha256"] == veil_files.sha256(out)
    assert "1 face(s) veiled" in flow.apply.stdout

    # The photo: changed on the face, untouched away from it, the face hidden.
    side = _side(out_photo)
    assert side["type"] == "photo" and len(side["faces"]) == 1
    clean, veiled = image_io.read_image(flow.photo), image_io.read_image(out_photo)
    assert veiled.shape == clean.shape
    x1, y1, x2, y2 = side["faces"][0]["box"]
    diff = np.abs(veiled.astype(int) - clean)
    assert diff[round(y1):round(y2), round(x1):round(x2)].mean() > 20
    m = 0.75 * max(x2 - x1, y2 - y1)
    far = np.ones(clean.shape[:2], bool)
    far[max(0, round(y1 - m)):round(y2 + m), max(0, round(x1 - m)):round(x2 + m)] = False
    assert far.any()
    np.testing.assert_array_equal(veiled[far], clean[far])
    lms = [f["landmarks"] for f in side["faces"]]
    assert float(losses.ssim(_chips(clean, lms), _chips(veiled, lms))[0]) < 0.5

    # The video: the person's faces listed, other frames bit-identical (lossless output).
    side = _side(out_video)
    assert side["type"] == "video" and side["frames"] == 65 and side["faces"]
    veiled_frames = sorted({e["frame"] for e in side["faces"]})
    assert set(veiled_frames) <= set(range(65))
    assert set(PERSON_FRAMES) <= set(veiled_frames)
    src, got = video_io.read_video(flow.video), video_io.read_video(out_video)
    assert got.shape == src.shape
    untouched = [t for t in range(65) if t not in veiled_frames]
    assert untouched
    np.testing.assert_array_equal(got[untouched], src[untouched])
    for t in PERSON_FRAMES:
        lms = [e["landmarks"] for e in side["faces"] if e["frame"] == t]
        assert float(losses.ssim(_chips(src[t], lms), _chips(got[t], lms))[0]) < 0.5


def test_cli_recover_photo(flow):
    assert "1 face(s) recovered" in flow.recover.stdout
    clean = image_io.read_image(flow.photo)
    got = image_io.read_image(flow.rec / "alex2.png")
    assert got.shape == clean.shape
    assert not veil_files.sidecar_path(flow.rec / "alex2.png").exists()
    # Exact up to the uint8 rounding of the veiled photo, amplified by 1 / alpha.
    assert np.abs(got.astype(int) - clean).max() <= _tol(ALPHA)
    lms = [f["landmarks"] for f in _side(flow.out / "alex2.png")["faces"]]
    assert float(losses.ssim(_chips(clean, lms), _chips(got, lms))[0]) >= 0.95


def _video_ssims(flow) -> list[tuple[int, float, int]]:
    """Returns (frame, face-chip SSIM recovered vs source, veiled faces in that frame)."""
    entries = _side(flow.out / "hamilton_clip.mp4")["faces"]
    src = video_io.read_video(flow.video)
    got = video_io.read_video(flow.rec / "hamilton_clip.mp4")
    assert got.shape == src.shape
    per_frame = {}
    for e in entries:
        per_frame.setdefault(e["frame"], []).append(e["landmarks"])
    out = []
    for t, lms in sorted(per_frame.items()):
        ssim = np.asarray(losses.ssim(_chips(src[t], lms), _chips(got[t], lms)))
        out += [(t, float(s), len(lms)) for s in ssim]
    return out


def test_cli_recover_video(flow):
    ssims = _video_ssims(flow)
    # The recovered video is H.264 (lossy): close, not exact.
    assert np.mean([s for _, s, _ in ssims]) >= 0.9, ssims
    alone = [s for _, s, n in ssims if n == 1]
    assert alone and min(alone) >= 0.95, ssims


def test_cli_video_veils_never_overlap_and_every_face_recovers(flow):
    # Recovery removes each face's veil on its own, which inverts the blend only where one veil
    # lies: overlapping detections of the person (frame 45 of the clip has a second, smaller
    # one over the face) must leave the smaller face unveiled.
    side = _side(flow.out / "hamilton_clip.mp4")
    per_frame = {}
    for e in side["faces"]:
        per_frame.setdefault(e["frame"], []).append(e["landmarks"])
    rec = registry.get("dlib")
    for t, lms in per_frame.items():
        box = veils.footprints(np.array(lms, np.float32), rec)
        for a in range(len(box)):
            for b in range(a + 1, len(box)):
                overlap = (min(box[a, 2], box[b, 2]) > max(box[a, 0], box[b, 0])
                           and min(box[a, 3], box[b, 3]) > max(box[a, 1], box[b, 1]))
                assert not overlap, (t, box)
    assert min(s for _, s, _ in _video_ssims(flow)) >= 0.9


def _empty(path) -> bool:
    return not path.exists() or not any(path.iterdir())


def test_cli_recover_wrong_passphrase(flow, tmp_path):
    dest = tmp_path / "REC2"
    proc = _faceveil("veil", "recover", flow.out / "alex2.png", "--key", flow.key, "--out", dest,
                     "--passphrase_env", "OTHER_PASSPHRASE", env={"OTHER_PASSPHRASE": "wrong one"})
    assert proc.returncode == 1, proc.stderr
    assert "wrong passphrase" in proc.stderr and str(flow.key) in proc.stderr
    assert _empty(dest)


def test_cli_recover_tampered_key(flow, tmp_path):
    data = bytearray(flow.key.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "tampered.veil"
    bad.write_bytes(bytes(data))
    dest = tmp_path / "REC3"
    proc = _faceveil("veil", "recover", flow.out / "alex2.png", "--key", bad, "--out", dest,
                     env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert "modified" in proc.stderr or "damaged" in proc.stderr, proc.stderr
    assert _empty(dest)


def test_cli_recover_file_never_veiled(flow, tmp_path):
    dest = tmp_path / "REC4"
    proc = _faceveil("veil", "recover", flow.photo, "--key", flow.key, "--out", dest, env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert "was not veiled" in proc.stderr and "alex2.png" in proc.stderr
    assert _empty(dest)


def test_cli_recover_changed_file(flow, tmp_path):
    src = flow.out / "alex2.png"
    changed = tmp_path / "in" / src.name
    changed.parent.mkdir()
    shutil.copy(veil_files.sidecar_path(src), veil_files.sidecar_path(changed))
    img = np.asarray(Image.open(src).convert("RGB")).copy()
    img[5, 7] = 255 - img[5, 7]  # one pixel, far from the face
    Image.fromarray(img).save(changed)
    dest = tmp_path / "REC5"
    proc = _faceveil("veil", "recover", changed, "--key", flow.key, "--out", dest, env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert "has changed" in proc.stderr, proc.stderr
    assert _empty(dest)
