"""The package reads bottom-up: no dvfl module imports from a layer above its own.

Read from the source with :mod:`ast` (every import, top-level or inside a function), so the test
needs no Ray and imports nothing. A new module must be given a layer in ``LAYERS``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import from its own layer and the layers below it
LAYERS = [
    ("base", ["dvfl.paths", "dvfl.storage", "dvfl.runtime", "dvfl.scratch", "dvfl.locks", "dvfl.host", "dvfl.signals",
              "dvfl.allocator"]),
    ("models", ["dvfl", "dvfl.models", "dvfl.losses", "dvfl.artifacts", "dvfl.profile"]),
    ("data", ["dvfl.data", "dvfl.teacher_cache"]),
    ("config", ["dvfl.config"]),
    ("training", ["dvfl.train"]),
    ("pipeline", ["dvfl.pipeline", "dvfl.protocol", "dvfl.tune", "dvfl.inference", "dvfl.export", "dvfl.serve",
                  "dvfl.cluster"]),
    ("entry points", ["dvfl.cli", "dvfl.commands", "dvfl.__main__"]),
]
NO_RAY = {"models"}  # models and losses run without Ray (a notebook, an exported model)
OUTSIDE = ("pipelines", "tuning", "benchmarks", "tests")  # entry points and tools: nothing in dvfl imports them


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "dvfl").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    best, rank = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > rank:
                best, rank = i, len(prefix)
    if best is None or (rank == len("dvfl") and module != "dvfl"):
        raise AssertionError(f"{module} has no layer: add it to LAYERS in {__file__}")
    return best


def imports_of(module: str) -> set[str]:
    """Every module ``module`` imports (``from a import b`` -> ``a.b`` when that is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # (`from ray import tune`: ray.tune, as `import ray.tune` reads)
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES or not base.startswith("dvfl")
                          else base)
    return found


def _internal(name: str) -> str | None:
    """The dvfl module an imported name lives in (``dvfl.data.shards.read_table`` -> ``dvfl.data.shards``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_every_dvfl_module_has_a_layer():
    assert len(MODULES) > 40
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for module in MODULES:
        mine = layer_of(module)
        for name in imports_of(module):
            target = _internal(name) if name.split(".")[0] == "dvfl" else None
            if target is not None and layer_of(target) > mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_dvfl_module_imports_an_entry_point_or_a_tool():
    bad = [f"{module} imports {name}" for module in MODULES for name in imports_of(module)
           if name.split(".")[0] in OUTSIDE]
    assert not bad, bad


def _reaches(module: str, wanted: tuple, seen: set) -> str | None:
    """The import chain from ``module`` (through dvfl modules) to a name under one of ``wanted``."""
    if module in seen:
        return None
    seen.add(module)
    for name in sorted(imports_of(module)):
        if any(name == w or name.startswith(w + ".") for w in wanted):
            return f"{module} imports {name}"
        target = _internal(name) if name.split(".")[0] == "dvfl" else None
        if target is not None:
            chain = _reaches(target, wanted, seen)
            if chain:
                return f"{module} -> {chain}"
    return None


def test_models_and_losses_never_import_ray_even_indirectly():
    low = [m for m in MODULES if LAYERS[layer_of(m)][0] in NO_RAY]
    assert "dvfl.models.video_focalnet" in low and "dvfl.losses" in low
    chains = [c for c in (_reaches(m, ("ray",), set()) for m in low) if c]
    assert not chains, chains


def test_the_import_reader_sees_lazy_and_relative_imports():
    # the reader itself: an import inside a function and a relative import are both seen
    assert "dvfl.data.shards" in imports_of("dvfl.data.ingest")  # `from . import shards as _s`
    assert "ray" in imports_of("dvfl.data.ingest")  # `import ray` inside a function
    assert layer_of("dvfl.train.loop") > layer_of("dvfl.data.views") > layer_of("dvfl.models.video_focalnet")



def test_the_training_loop_reaches_ray_only_through_its_session():
    # dvfl.train.session is the loop's one door to Ray (Train worker or Tune trial)
    for module in ("dvfl.train.loop", "dvfl.train.loop_config", "dvfl.train.hooks"):
        direct = sorted(name for name in imports_of(module) if name.split(".")[0] == "ray")
        assert not direct, f"{module} imports {direct}"
        # nor through another module than the session (the data layer may read with Ray Data; Train,
        # Tune, the launcher and the pipeline are not reached)
        assert _reaches(module, ("ray.train", "ray.tune", "ray.air", "dvfl.train.launch", "dvfl.tune",
                                 "dvfl.pipeline"), {"dvfl.train.session"}) is None
    assert any(name.split(".")[0] == "ray" for name in imports_of("dvfl.train.session"))
    assert _reaches("dvfl.train.session", ("ray.train",), set())  # (the walk finds what is there,
    assert _reaches("dvfl.train.session", ("ray.tune",), set())  # `from ray import tune` too)
