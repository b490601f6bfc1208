"""faceveil.engine's curated surface, typed results and the one-way imports between folders."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

from faceveil import engine

ENGINE = Path(engine.__file__).parent


def test_curated_surface_is_importable_and_documented():
    assert len(engine.__all__) == len(set(engine.__all__))
    for name in engine.__all__:
        obj = getattr(engine, name)
        doc = inspect.getdoc(obj)
        assert doc and doc.strip(), f"faceveil.engine.{name} has no docstring"
    for fn in (engine.cloak_images, engine.cloak_video, engine.protect_photos,
               engine.protect_video, engine.photo_summary, engine.video_summary):
        assert inspect.getdoc(fn).startswith("Returns"), fn.__name__


def test_results_are_dataclasses_without_private_keys():
    for cls in (engine.PhotoResult, engine.VideoResult, engine.FaceRecords):
        assert dataclasses.is_dataclass(cls)
        assert not [f.name for f in dataclasses.fields(cls) if f.name.startswith("_")]


def test_method_interface_is_met_by_the_cloak():
    method = engine.CloakMethod(recogniser=_FakeGeometry(), config=engine.CloakConfig())
    for name in ("cache_key", "init_state", "target_spec", "step"):
        assert callable(getattr(method, name)), name
    assert method.name == "cloak"
    # Frozen configs, hashable methods: one compilation per (method, config).
    assert hash(method) == hash(engine.CloakMethod(_FakeGeometry(), engine.CloakConfig()))


class _FakeGeometry:
    """A stand-in recogniser description: only the fields a method's cache key reads."""

    name = "geometry_only"
    chip_size = 8
    template = (0.0,)
    aspect = 1.0

    @staticmethod
    def apply(params, chips):
        return chips


def _imports(path: Path) -> set[str]:
    """Returns the faceveil.engine modules a file imports (at any depth of the code)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "faceveil.engine"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if (ENGINE.parent / (full.replace("faceveil.", "").replace(
                    ".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("faceveil.engine")}
    return out


def test_engine_modules_import_without_cycles():
    mods = {}
    for path in ENGINE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        name = "faceveil." + ".".join(path.relative_to(ENGINE.parent).with_suffix("").parts)
        mods[name] = {m for m in _imports(path) if m != name}
    state: dict[str, int] = {}

    def visit(m, stack):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(stack + [m]))
        if state.get(m) == 2 or m not in mods:
            return
        state[m] = 1
        for n in sorted(mods[m]):
            visit(n, stack + [m])
        state[m] = 2

    for m in sorted(mods):
        visit(m, [])


def test_data_flows_one_way_between_folders():
    # commands -> pipeline/methods/attacks; nothing below the commands imports them, and
    # methods/base (the interface) imports no pipeline code.
    for path in ENGINE.rglob("*.py"):
        rel = path.relative_to(ENGINE)
        if rel == Path("__init__.py"):  # the curated surface re-exports every folder
            continue
        deps = _imports(path)
        if rel.parts[0] != "commands":
            assert not [d for d in deps if ".commands" in d], (rel, deps)
        if rel.parts[0] not in ("attacks", "commands"):  # `faceveil attack` runs the attacks
            assert not [d for d in deps if ".attacks" in d], (rel, deps)
    assert not [d for d in _imports(ENGINE / "methods" / "base.py") if ".pipeline" in d]
