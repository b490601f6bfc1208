"""Passphrase-encrypted key files: the secret behind a veil (and, later, a mask template).

Layout: b"FVKEY\\n", a 4-byte big-endian header length, a UTF-8 JSON header, then the AES-GCM
ciphertext. The header is {"format": 1, "kind": "veil", "kdf": {"name": "scrypt", "n", "r", "p",
"salt"}, "nonce", "check"} (bytes as base64). The plaintext is an uncompressed `np.savez` archive
of the arrays plus "__meta__", the JSON metadata as uint8; it is loaded with allow_pickle=False,
so a key file can never run code.

Why this shape:
- scrypt (n=2**15, r=8: 32 MiB and ~0.1 s per try) makes guessing a passphrase costly even on a
  GPU, so a lost or copied key file reveals nothing but its kind and size; the salt is random per
  file, so equal passphrases give unrelated keys.
- "check" (16 bytes of SHA-256 over the derived key) tells a wrong passphrase from a damaged file;
  it gives an attacker nothing the GCM tag would not, since both need the same scrypt work.
- The header is GCM associated data: editing any header byte (kind, KDF cost, nonce) fails
  authentication. The file is written atomically with mode 0600 from creation.
Every failure is a `KeyFileError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import getpass
import hashlib
import io
import json
import os
import secrets
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from faceveil.engine.pipeline import image_io

MAGIC = b"FVKEY\n"
FORMAT = 1
SCRYPT_N = 2**15
_R, _P = 8, 1
# Bounds on what a header may ask for, so a crafted file cannot make reading it take gigabytes.
_MAX_HEADER = 1 << 16
_MAX_SCRYPT_MEM = 1 << 30
_TAG = 16
_EXISTS = "exists; pass overwrite to replace it"


class KeyFileError(image_io.InputError):
    """A key file cannot be read or written; `str(e)` is "<path>: <reason>"."""


@dataclasses.dataclass(frozen=True)
class KeyContents:
    """What a key file holds: its kind, JSON metadata and named arrays."""

    kind: str
    meta: dict
    arrays: dict[str, np.ndarray]


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # NFC: the same passphrase typed through different input methods must give the same key.
    pw = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(pw)


def _check(key: bytes) -> bytes:
    return hashlib.sha256(b"faceveil key check" + key).digest()[:16]


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def seal(
    kind: str, meta: Mapping, arrays: Mapping[str, np.ndarray], passphrase: str, *,
    n: int = SCRYPT_N,
) -> bytes:
    """Returns the bytes of a key file holding `meta` and `arrays`, encrypted under `passphrase`.

    ValueError for an array named "__meta__" or of object dtype (it would need pickle); TypeError
    when `meta` is not JSON-serialisable.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if "__meta__" in arrays or any(a.dtype.hasobject for a in arrays.values()):
        raise ValueError("arrays must not be named __meta__ or hold Python objects")
    buf = io.BytesIO()
    meta_bytes = json.dumps(dict(meta)).encode("utf-8")
    np.savez(buf, __meta__=np.frombuffer(meta_bytes, np.uint8), **arrays)
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    key = _derive(passphrase, salt, n, _R, _P)
    header = json.dumps({
        "format": FORMAT, "kind": kind,
        "kdf": {"name": "scrypt", "n": n, "r": _R, "p": _P, "salt": _b64(salt)},
        "nonce": _b64(nonce), "check": _b64(_check(key)),
    }).encode("utf-8")
    aad = MAGIC + len(header).to_bytes(4, "big") + header
    return aad + AESGCM(key).encrypt(nonce, buf.getvalue(), aad)


def unseal(data: bytes, passphrase: str, *, kind: str, source: str = "key") -> KeyContents:
    """Returns the contents of key-file bytes `data`; a `KeyFileError` naming `source` (the
    file's path) on any failure: not a key file, truncated, damaged, another format or kind, wrong
    passphrase, or modified since it was written."""

    def fail(reason: str) -> KeyFileError:
        return KeyFileError(source, reason)

    if not data:
        raise fail("is empty")
    if not data.startswith(MAGIC):
        raise fail("is truncated" if MAGIC.startswith(data) else "is not a faceveil key file")
    start = len(MAGIC) + 4
    size = int.from_bytes(data[len(MAGIC):start], "big")
    if len(data) < start or size > _MAX_HEADER or start + size > len(data):
        raise fail("is truncated or damaged (header length beyond the data)")
    raw = data[start:start + size]
    try:
        header = json.loads(raw.decode("utf-8"))
        version = header["format"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise fail("is truncated or damaged (header is not valid JSON)") from e
    if version != FORMAT:
        raise fail(f"has key file format {version!r}; this faceveil reads format {FORMAT}")
    try:
        found, kdf = header["kind"], header["kdf"]
        n, r, p = (int(kdf[k]) for k in ("n", "r", "p"))
        salt, nonce, check = (base64.b64decode(s, validate=True)
                              for s in (kdf["salt"], header["nonce"], header["check"]))
        if (kdf["name"] != "scrypt" or not isinstance(found, str) or len(nonce) != 12
                or n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16
                or 128 * n * r > _MAX_SCRYPT_MEM):
            raise ValueError("unexpected header values")
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise fail(f"is damaged (bad header: {e})") from e
    if found != kind:
        raise fail(f"is a {found} key, not a {kind} key")
    ciphertext = data[start + size:]
    if len(ciphertext) < _TAG:
        raise fail("is truncated (ciphertext shorter than its authentication tag)")
    key = _derive(passphrase, salt, n, r, p)
    if not secrets.compare_digest(_check(key), check):
        raise fail("wrong passphrase")
    try:
        payload = AESGCM(key).decrypt(nonce, ciphertext, data[:start + size])
    except InvalidTag as e:
        raise fail("the key file was modified or damaged (authentication failed)") from e
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    except (KeyError, ValueError, OSError, EOFError) as e:
        # Authenticated yet unreadable: written by a broken or foreign writer.
        raise fail(f"is damaged (unreadable contents: {e})") from e
    return KeyContents(kind=found, meta=meta, arrays=arrays)


def write_key(
    path: str | os.PathLike, kind: str, meta: Mapping, arrays: Mapping[str, np.ndarray],
    passphrase: str, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
    n: int = SCRYPT_N,
) -> Path:
    """Returns the path written: a new key file, atomically, readable by its owner only (0600).

    KeyFileError when `path` exists and `overwrite` is False; OutputError when the folder cannot
    be written or `path` is one of `inputs`. A failed write leaves nothing behind.
    """
    path = image_io.ensure_not_input(path, inputs, overwrite=overwrite)
    if not overwrite and path.exists():
        raise KeyFileError(path, _EXISTS)
    data = seal(kind, meta, arrays, passphrase, n=n)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600, so the secret is never readable by others, even briefly.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise image_io.OutputError(
            path, f"cannot write in folder {path.parent} ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                # link() refuses an existing target: no race between the check above and here.
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(path, _EXISTS) from None
            except OSError:
                # File systems without hard links (FAT, some network shares): check, then rename.
                if path.exists():
                    raise KeyFileError(path, _EXISTS) from None
                os.replace(tmp, path)
    except OSError as e:
        raise image_io.OutputError(path, f"could not be written ({e.strerror or e})") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def read_key(path: str | os.PathLike, passphrase: str, *, kind: str) -> KeyContents:
    """Returns the contents of the key file at `path`, a key of `kind` (else `KeyFileError`)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(path, "no such key file") from None
    except IsADirectoryError:
        raise KeyFileError(path, "is a folder, not a key file") from None
    except OSError as e:
        raise KeyFileError(path, f"cannot be read ({e.strerror or e})") from e
    return unseal(data, passphrase, kind=kind, source=os.fspath(path))


def read_passphrase(
    *, env: str | None = None, file: str | None = None, confirm: bool = False,
    min_length: int = 8, what: str = "passphrase",
) -> str:
    """Returns a passphrase from `file`, else the environment variable `env`, else a prompt.

    There is deliberately no way to pass one on the command line, where other users can see it
    (ps) and the shell history keeps it. A file gives its first line without the line ending.
    `confirm` (creating a key) prompts twice and enforces `min_length`. InputError when the file
    is missing, nothing is given and there is no terminal, the entries differ, or it is empty.
    """
    if file is not None:
        source: str = file
        try:
            text = Path(file).read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            raise image_io.InputError(file, f"no such {what} file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise image_io.InputError(file, f"cannot be read as a {what} file ({e})") from e
        value = text.partition("\n")[0].removesuffix("\r")
    elif env and os.environ.get(env):
        source, value = f"${env}", os.environ[env]
    elif sys.stdin.isatty():
        source, value = what, getpass.getpass(f"{what.capitalize()}: ")
        if confirm and getpass.getpass(f"Repeat the {what}: ") != value:
            raise image_io.InputError(what, "the two entries differ")
    else:
        hint = f"set the environment variable {env}, " if env else ""
        raise image_io.InputError(
            what, f"no {what}: {hint}pass a {what} file, or run in a terminal")
    if not value:
        raise image_io.InputError(source, f"the {what} is empty")
    if confirm and len(value) < min_length:
        raise image_io.InputError(source, f"too short: use at least {min_length} characters")
    return value
