"""The two trained networks of the mask-template method (DESIGN.md method 3, Wang et al.).

`TemplateNet`: VGG-like, batch norm, 4x4 convolutions of stride 2: an aligned face frame
[N, G, G, 3] in [0, 1] -> a low-dimensional template basis [N, G/8, G/8, K]. A recogniser's
template is the basis weighted by its coefficients tau [K] (`templates`), so the templates of
several recognisers superpose linearly (one basis, a tau per recogniser).

`KeyGenerator`: DCGAN-like (strided convolutions down, transposed convolutions up, batch norm,
no pooling, no dense layer): conditioning maps [N, G, G, C] (the template, the pixel
statistics near the landmarks or noise, the number of key bits) -> a signed change
[N, G, G, 3] in [-1, 1], in units of the key's range 2^b - 1 (`methods.mask_model` turns it
into each pixel's b-bit key). Fully convolutional, so G is any multiple of 8.

Both are plain flax.linen modules; their parameters are pytrees trained by
`faceveil.engine.pipeline.mask_training`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

MAX_BITS = 4  # a key flips at most the 4 low-order bits of a pixel


class TemplateNet(nn.Module):
    """Face frame [N, G, G, 3] -> template basis [N, G/8, G/8, basis] (module docstring)."""

    width: int = 32
    basis: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = 2.0 * x - 1.0
        for i, c in enumerate((self.width, 2 * self.width, 4 * self.width)):
            # Each stage halves the side with a 4x4 stride-2 convolution, then refines (VGG).
            for strides, kernel in (((2, 2), (4, 4)), ((1, 1), (3, 3))):
                h = nn.Conv(c, kernel, strides=strides, padding="SAME", use_bias=False,
                            name=f"conv{i}_{strides[0]}")(h)
                h = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                 name=f"bn{i}_{strides[0]}")(h)
                h = nn.relu(h)
        return nn.Conv(self.basis, (1, 1), name="basis")(h)


def templates(basis: jax.Array, tau: jax.Array) -> jax.Array:
    """Returns the soft templates [N, h, w, R]: sum_k tau[r, k] * basis[..., k].

    Args:
      basis: [N, h, w, K] TemplateNet output.
      tau: [R, K] coefficients of R recognisers.
    """
    return jnp.einsum("nhwk,rk->nhwr", basis, tau)


class KeyGenerator(nn.Module):
    """Conditioning maps [N, G, G, C] -> signed change [N, G, G, 3] in [-1, 1]."""

    width: int = 32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        def norm(h, name):
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)(h)

        h = z
        for i, c in enumerate((self.width, 2 * self.width, 4 * self.width)):
            h = nn.Conv(c, (4, 4), strides=(2, 2), padding="SAME", use_bias=False,
                        name=f"down{i}")(h)
            h = nn.leaky_relu(norm(h, f"bn_down{i}"), 0.2)
        for i, c in enumerate((2 * self.width, self.width, self.width)):
            h = nn.ConvTranspose(c, (4, 4), strides=(2, 2), padding="SAME", use_bias=False,
                                 name=f"up{i}")(h)
            h = nn.relu(norm(h, f"bn_up{i}"))
        return jnp.tanh(nn.Conv(3, (3, 3), padding="SAME", name="change")(h))
