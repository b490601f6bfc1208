"""The attack suite's library: the black-box decoder, the attribute and UP evaluators, pairing.

dlib only, at cut 1, with a decoder of width 2 trained a step or two on a few chips (CPU
seconds): these tests check the machinery (shapes, ranges, checkpoints, resume, pairing), not
how well the attacks work.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from faceveil.engine.attacks import attributes, decoder, paired, up
from faceveil.engine.methods import pmt
from faceveil.engine.pipeline import image_io, recognise
from faceveil.models import attributes as attribute_models

TINY = decoder.DecoderConfig(width=2, steps=2, batch=1, checkpoint_every=1, log_every=1)


@pytest.fixture(scope="module")
def chips() -> np.ndarray:
    """Returns [3, 150, 150, 3] float32 chips in [0, 1]: smooth random images (any chip will do)."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0.0, 1.0, (3, 10, 10, 3)).astype(np.float32)
    return np.asarray(jax.image.resize(coarse, (3, 150, 150, 3), "linear"))


@pytest.fixture(scope="module")
def face_chips(data_dir) -> np.ndarray:
    """Returns dlib chips [3, 150, 150, 3] of three real faces (two people)."""
    x, names = decoder.face_chips([data_dir / "faces" / "obama" / "obama1.jpg",
                                   data_dir / "faces" / "obama" / "obama2.jpg",
                                   data_dir / "faces" / "biden" / "biden2.jpg"], "dlib")
    assert names == ["obama", "obama", "biden"]
    return x


def _features(x: np.ndarray, cut: int = 1) -> np.ndarray:
    rec, params = recognise.recogniser_params("dlib")
    return np.asarray(pmt.cut_features(rec, params, x, cut))


def _leaves_equal(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# --- Decoder -----------------------------------------------------------------------------------


def test_decoder_decodes_chips_and_survives_save_and_load(chips, tmp_path):
    dec = decoder.train("dlib", chips, 1, TINY)
    assert (dec.recogniser, dec.cut, dec.step, dec.config) == ("dlib", 1, 2, TINY)
    f = _features(chips)
    out = dec.decode(f)
    assert out.shape == chips.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0

    for where in (tmp_path / "dec.npz", tmp_path / "folder"):
        dec.save(where)
        back = decoder.Decoder.load(where)
        assert (back.recogniser, back.cut, back.step, back.config) == ("dlib", 1, 2, TINY)
        _leaves_equal(back.params, dec.params)
        np.testing.assert_array_equal(back.decode(f), out)
    assert (tmp_path / "folder" / decoder.CHECKPOINT_FILE).is_file()

    with pytest.raises(ValueError, match="at cut 1 takes"):
        dec.decode(f[:, :10])
    result = decoder.attack(dec, f, chips)
    assert result.chips.shape == chips.shape and result.ssim.shape == (3,)
    assert np.all(np.isfinite(result.psnr)) and result.matched.dtype == bool


def test_decoder_resumes_its_checkpoint_and_ends_where_one_run_would(chips, tmp_path, capsys):
    ckpt = tmp_path / "dec"
    first = decoder.train("dlib", chips, 1, TINY, checkpoint_dir=ckpt)
    assert decoder.Decoder.load(ckpt).step == 2
    capsys.readouterr()

    longer = dataclasses.replace(TINY, steps=3)
    resumed = decoder.train("dlib", chips, 1, longer, checkpoint_dir=ckpt)
    err = capsys.readouterr().err
    assert "resuming from" in err and "at step 2" in err and "step 3/3" in err
    assert "step 1/3" not in err and "step 2/3" not in err  # steps 1-2 were not redone
    assert resumed.step == 3 and decoder.Decoder.load(ckpt).step == 3
    # An uninterrupted 3-step run draws the same batches (fold_in(key, step)): same decoder.
    whole = decoder.train("dlib", chips, 1, longer)
    _leaves_equal(resumed.params, whole.params)
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(first.params["net"])[0]),
                              np.asarray(jax.tree_util.tree_leaves(resumed.params["net"])[0]))
    # steps and cadence do not enter the step: the runs share one compiled step.
    assert decoder._step_fn("dlib", 1, TINY) is decoder._step_fn("dlib", 1, longer)

    # Another seed is another run: its checkpoint is not resumed but replaced.
    reseeded = dataclasses.replace(longer, seed=1)
    fresh = decoder.train("dlib", chips, 1, reseeded, checkpoint_dir=ckpt)
    err = capsys.readouterr().err
    assert "not resuming" in err and "step 1/3" in err and fresh.step == 3
    assert decoder.Decoder.load(ckpt).config == reseeded
    # A finished run asked again trains nothing more.
    again = decoder.train("dlib", chips, 1, reseeded, checkpoint_dir=ckpt)
    assert again.step == 3 and "loss" not in capsys.readouterr().err
    _leaves_equal(again.params, fresh.params)


def test_decoder_load_names_a_bad_checkpoint_and_leaks_no_tracer(chips, tmp_path):
    with pytest.raises(FileNotFoundError):
        decoder.Decoder.load(tmp_path / "none")
    bad = tmp_path / "bad" / decoder.CHECKPOINT_FILE
    bad.parent.mkdir()
    bad.write_bytes(b"not a zip file")
    with pytest.raises(image_io.InputError) as e:
        decoder.Decoder.load(bad.parent)
    assert e.value.path == bad and "not a decoder checkpoint" in str(e.value)

    dec = decoder.train("dlib", chips, 1, dataclasses.replace(TINY, steps=1))
    dec.save(tmp_path / "ok.npz")
    wide = dataclasses.replace(dec, config=dataclasses.replace(TINY, width=4))
    wide.save(tmp_path / "wide.npz")  # a width-4 record with width-2 arrays
    with pytest.raises(image_io.InputError, match="shape"):
        decoder.Decoder.load(tmp_path / "wide.npz")

    # Loading first in a process must not leave tracers in the cached recogniser params.
    recognise.recogniser_params.cache_clear()
    decoder._feature_shape.cache_clear()
    decoder.Decoder.load(tmp_path / "ok.npz")
    _, params = recognise.recogniser_params("dlib")
    assert all(isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer)
               for v in jax.tree_util.tree_leaves(params))


def test_train_refuses_bad_chips_and_cuts(chips):
    with pytest.raises(ValueError, match="needs"):
        decoder.train("dlib", chips[:, :100], 1, TINY)
    with pytest.raises(ValueError, match="needs"):
        decoder.train("dlib", chips[:0], 1, TINY)
    with pytest.raises(ValueError, match="cut 9"):
        decoder.train("dlib", chips, 9, TINY)
    with pytest.raises(ValueError, match="width"):
        decoder.DecoderConfig(width=1)


# --- Attributes --------------------------------------------------------------------------------


def test_attribute_compare_of_identical_faces_is_a_perfect_match(face_chips):
    model = attribute_models.load()
    res = attributes.evaluate(model, face_chips, face_chips.copy())
    np.testing.assert_allclose(res.cosine, 1.0, atol=1e-12)
    np.testing.assert_array_equal(res.age_error, 0.0)
    assert res.gender_agree.all() and res.gender_agreement == 1.0
    assert res.mean_cosine == pytest.approx(1.0, abs=1e-12) and res.mean_age_error == 0.0
    s = res.summary()
    assert s["faces"] == 3 and s["max_age_error"] == 0.0 and len(s["per_face"]) == 3
    assert set(s["per_face"][0]) == {"age_original", "age_protected", "p_male_original",
                                     "p_male_protected", "cosine", "age_error", "gender_agree"}
    assert all(r["p_male_original"] > 0.5 for r in s["per_face"])  # Obama, Obama, Biden

    with pytest.raises(ValueError, match="differ in shape"):
        attributes.evaluate(model, face_chips, face_chips[:2])
    empty = attributes.evaluate(model, face_chips[:0], face_chips[:0])
    assert empty.summary()["faces"] == 0 and np.isnan(empty.mean_cosine)


def test_attribute_compare_by_hand():
    def attrs(age, male, vec):
        return attribute_models.Attributes(np.float32(age), np.float32(male), np.float32(vec))

    a = attrs([30.0, 50.0], [0.9, 0.2], [[1, 0, 0], [0, 1, 0]])
    b = attrs([34.0, 49.0], [0.4, 0.1], [[1, 1, 0], [0, 1, 0]])
    res = attributes.compare(a, b)
    np.testing.assert_allclose(res.cosine, [1 / np.sqrt(2), 1.0], atol=1e-7)
    np.testing.assert_allclose(res.age_error, [4.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(res.gender_agree, [False, True])
    assert res.gender_agreement == 0.5 and res.summary()["max_age_error"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="not paired"):
        attributes.compare(a, attrs([1.0], [0.5], [[1, 0, 0]]))


# --- UP ----------------------------------------------------------------------------------------


def test_up_curve_by_hand_and_monotone():
    res = up.curve([0.1, 0.3, 0.5], [0.5, 0.1, 0.9], sigmas=[0.0, 0.2, 0.4, 0.6], kappa=0.2)
    np.testing.assert_allclose(res.up, [2 / 3, 1 / 3, 1 / 3, 0.0], atol=1e-6)
    assert res.useful == pytest.approx(2 / 3)

    rng = np.random.default_rng(1)
    res = up.curve(rng.uniform(0, 0.8, 50), rng.uniform(-1, 1, 50))
    np.testing.assert_array_equal(res.sigmas, up.DEFAULT_SIGMAS)
    assert np.all((res.up >= 0) & (res.up <= 1)) and np.all(np.diff(res.up) <= 0)
    assert res.up[0] == pytest.approx(res.useful)  # every LPIPS >= 0
    s = res.summary()
    assert [c["sigma"] for c in s["curve"]] == list(up.DEFAULT_SIGMAS) and s["faces"] == 50
    with pytest.raises(ValueError, match="per face"):
        up.curve([0.1, 0.2], [0.5])
    assert np.isnan(up.curve([], []).up).all()


def test_up_evaluate_of_unchanged_faces_is_useful_but_not_private(face_chips):
    rec, params = recognise.recogniser_params("dlib")
    centre = np.asarray(rec.embed(params, face_chips)).mean(axis=0)
    res = up.evaluate(rec, params, face_chips, face_chips, centre=centre, sigmas=[0.0, 0.05])
    np.testing.assert_allclose(res.privacy, 0.0, atol=1e-4)
    np.testing.assert_allclose(res.utility, 1.0, atol=1e-5)
    np.testing.assert_allclose(res.up, [1.0, 0.0])

    noisy = np.clip(face_chips + np.random.default_rng(0).normal(0, 0.2, face_chips.shape),
                    0, 1).astype(np.float32)
    res = up.evaluate(rec, params, face_chips, noisy, centre=centre)
    assert np.all(res.privacy > 0.05) and np.all(np.diff(res.up) <= 0)
    assert np.all((res.up >= 0) & (res.up <= 1))
    with pytest.raises(ValueError, match="differ in shape"):
        up.evaluate(rec, params, face_chips, noisy[:2], centre=centre)


# --- Pairing -----------------------------------------------------------------------------------


def test_pair_files_by_stem(data_dir, tmp_path):
    orig = tmp_path / "orig" / "obama"
    orig.mkdir(parents=True)
    for name in ("obama1.jpg", "obama2.jpg"):
        shutil.copy(data_dir / "faces" / "obama" / name, orig / name)
    prot = tmp_path / "prot"
    prot.mkdir()
    for name in ("obama1_cloaked.png", "obama2.png", "obama2_face0.png"):
        (prot / name).write_bytes(b"")
    pairs = paired.pair_files([tmp_path / "orig"], [prot])
    assert [(p.protected.name, p.original.name, p.identity) for p in pairs] == [
        ("obama1_cloaked.png", "obama1.jpg", "obama"), ("obama2.png", "obama2.jpg", "obama")]
    assert not any(p.features for p in pairs)  # the chip preview beside obama2.png is skipped

    # An original named among the protected files is not judged against itself.
    assert len(paired.pair_files([tmp_path / "orig"], [prot, orig / "obama1.jpg"])) == 2
    with pytest.raises(paired.AttackInputError, match="every protected file"):
        paired.pair_files([orig], [orig])

    stray = prot / "stranger.png"
    stray.write_bytes(b"")
    with pytest.raises(paired.AttackInputError) as e:
        paired.pair_files([orig], [prot])
    assert e.value.path == stray and "no original photo of the same stem" in str(e.value)
    with pytest.raises(paired.AttackInputError, match="no such file"):
        paired.pair_files([orig], [tmp_path / "missing"])
    with pytest.raises(paired.AttackInputError, match="share the stem"):
        shutil.copy(orig / "obama1.jpg", tmp_path / "obama1.jpg")
        paired.pair_files([orig, tmp_path / "obama1.jpg"], [prot / "obama1_cloaked.png"])
