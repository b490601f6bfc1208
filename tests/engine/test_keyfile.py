"""Passphrase-encrypted key files: round trip, 0600, and a clear KeyFileError for every fault.

scrypt runs at n=2**10 here (the default 2**15 costs ~0.1 s a call); the cost is stored in the
header, so reading needs no override.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from faceveil.engine import keyfile
from faceveil.engine.pipeline import image_io

N = 2**10
PW = "correct horse battery"


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "delta": rng.normal(size=(3, 8, 8)).astype(np.float32),
        "mask": rng.integers(0, 256, (8, 8), dtype=np.uint8),
        "landmarks": rng.uniform(0, 100, (5, 2)),
    }


META = {"version": 1, "person": "Ada", "eps": 0.03, "models": ["facenet", "dlib"]}


@pytest.fixture
def sealed() -> bytes:
    return keyfile.seal("veil", META, _arrays(), PW, n=N)


def _unseal(data: bytes, pw: str = PW, kind: str = "veil") -> keyfile.KeyContents:
    return keyfile.unseal(data, pw, kind=kind, source="k.fvkey")


def _header_end(data: bytes) -> int:
    return len(keyfile.MAGIC) + 4 + int.from_bytes(data[6:10], "big")


def test_round_trip_bytes(sealed):
    got = _unseal(sealed)
    assert got.kind == "veil" and got.meta == META
    want = _arrays()
    assert set(got.arrays) == set(want)
    for k, v in want.items():
        assert got.arrays[k].dtype == v.dtype and got.arrays[k].shape == v.shape
        np.testing.assert_array_equal(got.arrays[k], v)


def test_format_layout(sealed):
    assert sealed.startswith(b"FVKEY\n")
    header = json.loads(sealed[10:_header_end(sealed)])
    assert header["format"] == 1 and header["kind"] == "veil"
    assert header["kdf"]["name"] == "scrypt" and header["kdf"]["n"] == N
    # Nothing of the metadata or arrays is readable without the passphrase.
    assert b"Ada" not in sealed and b"delta" not in sealed


def test_each_seal_uses_fresh_salt_and_nonce():
    a, b = (keyfile.seal("veil", META, _arrays(), PW, n=N) for _ in range(2))
    assert a != b


def test_write_and_read_key(tmp_path):
    path = keyfile.write_key(tmp_path / "ada.fvkey", "veil", META, _arrays(), PW, n=N)
    assert path == tmp_path / "ada.fvkey"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ada.fvkey"]  # no temp file left
    got = keyfile.read_key(path, PW, kind="veil")
    assert got.meta == META
    np.testing.assert_array_equal(got.arrays["landmarks"], _arrays()["landmarks"])


def test_wrong_passphrase(sealed):
    with pytest.raises(keyfile.KeyFileError, match="wrong passphrase") as e:
        _unseal(sealed, "not the passphrase")
    assert str(e.value).startswith("k.fvkey: ")


def test_flipped_ciphertext_byte_is_detected(sealed):
    data = bytearray(sealed)
    data[_header_end(sealed) + 40] ^= 0x01
    with pytest.raises(keyfile.KeyFileError, match="modified"):
        _unseal(bytes(data))


@pytest.mark.parametrize("field", ["format", "kind", "n", "salt", "nonce", "check", "json"])
def test_header_change_is_detected(sealed, field):
    end = _header_end(sealed)
    header = json.loads(sealed[10:end])
    if field == "json":
        raw = sealed[10:end].replace(b"{", b"[", 1)
    else:
        if field == "format":
            header["format"] = 2
        elif field == "kind":
            header["kind"] = "vail"
        elif field == "n":
            header["kdf"]["n"] = N * 2
        else:
            target = header["kdf"] if field == "salt" else header
            s = target[field]
            target[field] = ("B" if s[0] == "A" else "A") + s[1:]
        raw = json.dumps(header).encode()
    data = sealed[:6] + len(raw).to_bytes(4, "big") + raw + sealed[end:]
    with pytest.raises(keyfile.KeyFileError):
        _unseal(data, kind="vail" if field == "kind" else "veil")


def test_header_byte_flip_fails_authentication(sealed):
    # A kind of the same length, so the header still parses and only the GCM tag can notice.
    data = sealed.replace(b'"kind": "veil"', b'"kind": "vEil"')
    assert data != sealed
    with pytest.raises(keyfile.KeyFileError, match="modified"):
        _unseal(data, kind="vEil")


def test_unsupported_format_names_the_version(sealed):
    data = sealed.replace(b'"format": 1', b'"format": 9')
    with pytest.raises(keyfile.KeyFileError, match="format 9"):
        _unseal(data)


def test_truncation_always_raises_key_file_error(sealed):
    cuts = [0, 3, 6, 8, 10, 20, _header_end(sealed), _header_end(sealed) + 15,
            len(sealed) // 2, len(sealed) - 1]
    for cut in cuts:
        with pytest.raises(keyfile.KeyFileError):
            _unseal(sealed[:cut])


def test_random_bytes_are_not_a_key():
    data = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(keyfile.KeyFileError, match="not a faceveil key"):
        _unseal(data)
    with pytest.raises(keyfile.KeyFileError, match="not a faceveil key"):
        _unseal(b"\x89PNG\r\n\x1a\n" + data)


def test_kind_mismatch():
    data = keyfile.seal("mask", {}, {"t": np.zeros(3)}, PW, n=N)
    with pytest.raises(keyfile.KeyFileError, match="is a mask key, not a veil key"):
        _unseal(data)


def test_seal_refuses_pickled_arrays():
    with pytest.raises(ValueError):
        keyfile.seal("veil", {}, {"x": np.array([{}], dtype=object)}, PW, n=N)
    with pytest.raises(ValueError):
        keyfile.seal("veil", {}, {"__meta__": np.zeros(2)}, PW, n=N)


def test_read_key_errors_name_the_file(tmp_path):
    with pytest.raises(keyfile.KeyFileError, match="no such key file") as e:
        keyfile.read_key(tmp_path / "missing.fvkey", PW, kind="veil")
    assert "missing.fvkey" in str(e.value)
    with pytest.raises(keyfile.KeyFileError, match="folder"):
        keyfile.read_key(tmp_path, PW, kind="veil")
    (tmp_path / "empty.fvkey").write_bytes(b"")
    with pytest.raises(keyfile.KeyFileError, match="empty"):
        keyfile.read_key(tmp_path / "empty.fvkey", PW, kind="veil")
    assert issubclass(keyfile.KeyFileError, image_io.InputError)


def test_write_key_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k.fvkey"
    path.write_bytes(b"precious")
    with pytest.raises(keyfile.KeyFileError, match="exists; pass overwrite"):
        keyfile.write_key(path, "veil", META, _arrays(), PW, n=N)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.fvkey"]
    keyfile.write_key(path, "veil", META, _arrays(), PW, n=N, overwrite=True)
    assert keyfile.read_key(path, PW, kind="veil").meta == META
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_key_refuses_an_input(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"img")
    with pytest.raises(image_io.OutputError, match="input"):
        keyfile.write_key(path, "veil", META, _arrays(), PW, n=N, inputs=[path])


def test_write_key_creates_missing_folders(tmp_path):
    path = keyfile.write_key(tmp_path / "a" / "b" / "k.fvkey", "veil", META, _arrays(), PW, n=N)
    assert keyfile.read_key(path, PW, kind="veil").kind == "veil"


def test_write_key_into_impossible_folder_leaves_nothing(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(image_io.OutputError):
        keyfile.write_key(tmp_path / "file" / "k.fvkey", "veil", META, _arrays(), PW, n=N)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_write_key_into_unwritable_folder_leaves_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(image_io.OutputError):
            keyfile.write_key(folder / "k.fvkey", "veil", META, _arrays(), PW, n=N)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_failed_rename_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", broken)
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(image_io.OutputError, match="No space"):
        keyfile.write_key(tmp_path / "k.fvkey", "veil", META, _arrays(), PW, n=N)
    assert list(tmp_path.iterdir()) == []


def test_write_without_hard_links_still_refuses_existing(tmp_path, monkeypatch):
    def no_links(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = keyfile.write_key(tmp_path / "k.fvkey", "veil", META, _arrays(), PW, n=N)
    assert keyfile.read_key(path, PW, kind="veil").meta == META
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.fvkey"]


# read_passphrase


@pytest.fixture
def no_tty(monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    monkeypatch.delenv("FV_TEST_PASS", raising=False)


def test_passphrase_from_file(tmp_path, no_tty):
    f = tmp_path / "pass.txt"
    f.write_bytes(b"s3cret phrase\r\nsecond line\n")
    assert keyfile.read_passphrase(file=str(f)) == "s3cret phrase"
    f.write_bytes(b"  spaces kept  \n")
    assert keyfile.read_passphrase(file=str(f)) == "  spaces kept  "


def test_passphrase_file_missing(tmp_path, no_tty):
    with pytest.raises(image_io.InputError, match="nope.txt"):
        keyfile.read_passphrase(file=str(tmp_path / "nope.txt"))


def test_passphrase_from_env(monkeypatch, no_tty):
    monkeypatch.setenv("FV_TEST_PASS", "from the environment")
    assert keyfile.read_passphrase(env="FV_TEST_PASS") == "from the environment"


def test_file_takes_precedence_over_env(tmp_path, monkeypatch, no_tty):
    monkeypatch.setenv("FV_TEST_PASS", "from the environment")
    f = tmp_path / "pass.txt"
    f.write_text("from the file\n")
    assert keyfile.read_passphrase(env="FV_TEST_PASS", file=str(f)) == "from the file"


def test_nothing_given_without_tty(monkeypatch, no_tty):
    monkeypatch.setenv("FV_TEST_PASS", "")  # empty counts as unset
    with pytest.raises(image_io.InputError, match="FV_TEST_PASS") as e:
        keyfile.read_passphrase(env="FV_TEST_PASS")
    assert "terminal" in str(e.value)


def test_prompt_on_tty(monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = iter(["long enough pw", "long enough pw"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert keyfile.read_passphrase(confirm=True) == "long enough pw"


def test_prompt_mismatch(monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = iter(["long enough pw", "long enough pX"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    with pytest.raises(image_io.InputError, match="differ"):
        keyfile.read_passphrase(confirm=True)


def test_confirm_rejects_short_passphrase(monkeypatch, no_tty):
    monkeypatch.setenv("FV_TEST_PASS", "short")
    with pytest.raises(image_io.InputError, match="at least 8"):
        keyfile.read_passphrase(env="FV_TEST_PASS", confirm=True)
    # Reading an existing key does not judge its passphrase.
    assert keyfile.read_passphrase(env="FV_TEST_PASS") == "short"
