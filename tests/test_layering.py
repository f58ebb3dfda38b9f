"""Layers point down: entrypoints -> engine -> executor -> worker -> (models, sample) -> layers ->
platforms -> kernels. Every import in the package (top-level or inside a function) is read from
the source, and none may reach a layer above its own module's."""
from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "pagoda"

# package -> packages it must never import
FORBIDDEN = {
    "kernels": {"platforms", "layers", "models", "sample", "worker", "executor", "engine", "inputs",
                "entrypoints", "bench", "llm"},
    "platforms": {"layers", "models", "sample", "worker", "executor", "engine", "inputs", "entrypoints",
                  "bench", "llm"},
    "distributed": {"layers", "models", "sample", "worker", "executor", "engine", "inputs",
                    "entrypoints", "bench", "llm"},
    "layers": {"models", "sample", "worker", "executor", "engine", "inputs", "entrypoints", "bench", "llm"},
    "models": {"sample", "worker", "executor", "engine", "inputs", "entrypoints", "bench", "llm"},
    "sample": {"models", "worker", "executor", "engine", "structured_output", "inputs", "entrypoints",
               "bench", "llm"},
    "worker": {"executor", "engine", "structured_output", "inputs", "entrypoints", "bench", "llm"},
    "executor": {"engine", "inputs", "entrypoints", "bench", "llm"},
    "engine": {"entrypoints", "bench", "llm"},
    "inputs": {"entrypoints", "bench", "llm"},
    # grammars: used by the engine core and the front end, imports neither
    "structured_output": {"kernels", "platforms", "layers", "models", "worker", "executor", "engine",
                          "inputs", "entrypoints", "bench", "llm"},
    # the plain-data modules at the top are below everything
    "config": {"kernels", "platforms", "layers", "models", "sample", "worker", "executor", "engine",
               "inputs", "entrypoints", "bench", "llm"},
    "sampling_params": {"kernels", "layers", "models", "worker", "engine", "entrypoints"},
    "beam_search": {"kernels", "layers", "models", "worker", "engine", "entrypoints"},
    "pooling_params": {"kernels", "layers", "models", "worker", "engine", "entrypoints"},
    "outputs": {"kernels", "layers", "models", "worker", "engine", "entrypoints"},
}


def pagoda_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported pagoda sub-package) of every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(PKG.parent).with_suffix("")
    here = list(rel.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here[:-node.level] if path.name != "__init__.py" else here[:len(here) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "pagoda" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def layer_of(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_the_checker_sees_imports(tmp_path):
    """The rule can fail: a worker module importing the engine is caught."""
    fake = PKG / "worker" / "_layering_probe.py"
    fake.write_text("def f():\n    from pagoda.engine.request import Request\n")
    try:
        assert (2, "engine") in pagoda_imports(fake)
        assert "engine" in FORBIDDEN[layer_of(fake)]
    finally:
        fake.unlink()


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_points_up(layer):
    files = [PKG / f"{layer}.py"] if (PKG / f"{layer}.py").exists() else sorted((PKG / layer).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(PKG.parent)}:{line} imports pagoda.{target}"
           for f in files for line, target in pagoda_imports(f) if target in FORBIDDEN[layer]]
    assert not bad, "imports that point up the stack:\n" + "\n".join(bad)


def test_worker_imports_nothing_from_the_engine():
    files = sorted((PKG / "worker").rglob("*.py"))
    assert any(f.name == "model_runner.py" for f in files)
    assert not [f for f in files if any(t == "engine" for _, t in pagoda_imports(f))]
