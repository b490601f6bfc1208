"""Split recognisers (PMT's shallow model): shallow part then rest is the whole model.

Expected values are the recognisers' own `apply` on the same real face chips (MTCNN landmarks,
each recogniser's template); the split must reproduce it to float32 rounding.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from faceveil.engine.pipeline import align, faces, image_io
from faceveil.models import registry
from tests.conftest import store_params

PHOTO = "multi/two_people.jpg"  # Biden and Obama: one detector pass (~8 s on CPU), two faces
WEIGHTS = {"dlib": "dlib_resnet", "facenet": "facenet"}


@pytest.fixture(scope="module")
def photo(data_dir):
    """Returns (float32 photo [H, W, 3] in [0, 1], landmarks [2, 5, 2]) of PHOTO's faces."""
    image = image_io.read_image(data_dir / PHOTO)
    found = faces.find_photo_faces(image)
    assert len(found.landmarks) == 2, f"{PHOTO}: {len(found.landmarks)} faces found"
    return np.asarray(image, np.float32) / 255.0, found.landmarks


@pytest.fixture(scope="module", params=sorted(WEIGHTS))
def model(request, photo):
    """Returns (recogniser, params, chips [2, S, S, 3], (embedding, features) of apply)."""
    rec = registry.get(request.param)
    params = jax.device_put(store_params(WEIGHTS[rec.name]))
    s = rec.chip_size
    image, lms = photo
    chips = np.stack(
        [np.asarray(align.extract_chip(image, lm, rec.template, s, rec.aspect)) for lm in lms]
    )
    return rec, params, chips, jax.jit(rec.apply)(params, chips)


def test_stages_are_features(model):
    rec, _, _, (_, feats) = model
    assert len(rec.stages) >= 2
    # The stages are the first of the named features (rec.layers, shallow to deep).
    assert rec.stages == rec.layers[: len(rec.stages)] and set(rec.stages) <= set(feats)


def test_shallow_then_rest_is_the_whole_model(model):
    rec, params, chips, (emb, feats) = model
    shallow = jax.jit(rec.shallow, static_argnums=2)
    rest = jax.jit(rec.rest, static_argnums=2)
    for cut in range(1, len(rec.stages)):
        outs = shallow(params, chips, cut)
        assert len(outs) == cut
        for name, out in zip(rec.stages, outs):
            assert out.shape == feats[name].shape and out.ndim == 4, (cut, name, out.shape)
        np.testing.assert_allclose(outs[-1], feats[rec.stages[cut - 1]], atol=1e-5, rtol=0)
        got = rest(params, outs[-1], cut)
        assert got.shape == emb.shape
        np.testing.assert_allclose(got, emb, atol=1e-5, rtol=0, err_msg=f"cut {cut}")


@pytest.mark.parametrize("where", ["zero", "all"])
def test_cut_outside_the_range_is_refused(model, where):
    rec, params, chips, _ = model
    n = len(rec.stages)
    cut = 0 if where == "zero" else n
    for split in (lambda: rec.shallow(params, chips, cut), lambda: rec.rest(params, chips, cut)):
        with pytest.raises(ValueError, match=rf"^cut {cut}: {rec.name} has stages 1\.\.{n - 1}"):
            split()


def test_split_does_not_recompile(model):
    rec, params, chips, _ = model
    cut = 2
    shallow = jax.jit(rec.shallow, static_argnums=2)
    rest = jax.jit(rec.rest, static_argnums=2)
    for x in (chips, chips[::-1] * 0.5):  # same shapes, other values
        rest(params, shallow(params, x, cut)[-1], cut)
    assert shallow._cache_size() == 1 and rest._cache_size() == 1
