"""Weight store: checksum pinning, atomic conversion, manifest consistency, clear errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from faceveil.models import store


@pytest.fixture()
def fake_home(tmp_path, monkeypatch):
    """Returns an empty store folder that $FACEVEIL_HOME points at."""
    home = tmp_path / "store"
    monkeypatch.setenv("FACEVEIL_HOME", str(home))
    return home


@pytest.fixture()
def toy_source(tmp_path, monkeypatch):
    """Returns (source, raw file) for a tiny model whose raw file is a .npy of two arrays."""
    raw = tmp_path / "toy.npy"
    np.save(raw, np.arange(6, dtype=np.float32).reshape(2, 3))
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()

    def convert(path):
        w = np.load(path)
        return {"dense": {"kernel": w, "bias": np.zeros(3, np.float32)}}

    src = store.WeightSource("toy", "toy-package", "1.0", "toy.npy", digest, convert)
    monkeypatch.setitem(store._SOURCES, "toy", src)
    return src, raw


def test_fetch_converts_once_and_loads(fake_home, toy_source):
    _, raw = toy_source
    store.fetch(["toy"], raw_file={"toy": raw}, log=lambda m: None)
    params = store.load("toy")
    np.testing.assert_array_equal(params["dense"]["kernel"], np.arange(6).reshape(2, 3))
    manifest = json.loads((fake_home / "manifest.json").read_text())
    assert manifest["toy"]["sha256"] == store.sha256_file(fake_home / "toy.npz")
    msgs = []
    store.fetch(["toy"], raw_file={"toy": raw}, log=msgs.append)
    assert any("already in the store" in m for m in msgs)


def test_checksum_mismatch_leaves_store_unchanged(fake_home, toy_source, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((2, 3), np.float32))
    with pytest.raises(store.StoreError, match="does not match the pinned"):
        store.fetch(["toy"], raw_file={"toy": bad}, log=lambda m: None)
    assert not (fake_home / "toy.npz").exists()
    assert not (fake_home / "manifest.json").exists()


def test_missing_and_truncated_files_name_the_fix(fake_home, toy_source):
    _, raw = toy_source
    with pytest.raises(store.StoreError, match="fetch-weights --models=toy"):
        store.load("toy")
    store.fetch(["toy"], raw_file={"toy": raw}, log=lambda m: None)
    target = fake_home / "toy.npz"
    target.write_bytes(target.read_bytes()[:40])  # a half-written file
    with pytest.raises(store.StoreError, match="incomplete"):
        store.load("toy")
    store.fetch(["toy"], raw_file={"toy": raw}, log=lambda m: None)  # repairs it
    assert store.load("toy")["dense"]["bias"].shape == (3,)


def test_no_temporary_files_left(fake_home, toy_source):
    _, raw = toy_source
    store.fetch(["toy"], raw_file={"toy": raw}, log=lambda m: None)
    assert sorted(p.name for p in fake_home.iterdir()) == ["manifest.json", "toy.npz"]


def test_unknown_model_is_a_clear_error(fake_home):
    with pytest.raises(store.StoreError, match="unknown model"):
        store.fetch(["no-such-model"])


def test_flatten_roundtrip():
    tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros(1)}}, "e": np.arange(3)}
    back = store.unflatten(store.flatten(tree))
    np.testing.assert_array_equal(back["a"]["c"]["d"], tree["a"]["c"]["d"])
    assert set(store.flatten(back)) == {"a/b", "a/c/d", "e"}
