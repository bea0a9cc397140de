"""The package layering: config, transport, plugins, processing, ml and metrics are lower layers;
runtime (and the cli and api above it) is higher. A lower layer never imports a higher one, and
the lower packages import one another without cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import streamflow

PACKAGE = Path(streamflow.__file__).parent
LOWER = ("config", "transport", "plugins", "processing", "ml", "metrics")
HIGHER = ("runtime", "cli", "api")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[str]:
    """Every streamflow module ``path`` imports, at its top or inside functions."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        yield from (name for name in names if name.split(".")[0] == "streamflow")


def layer(module: str) -> str | None:
    """The package under ``streamflow`` a module belongs to (None for ``streamflow`` itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_imports() -> dict[str, set[str]]:
    """For each lower package, the other packages its modules import."""
    graph: dict[str, set[str]] = {package: set() for package in LOWER}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = layer(module_name(path))
        if source not in LOWER:
            continue
        graph[source] |= {target for name in imported(path)
                          if (target := layer(name)) not in (None, source)}
    return graph


def test_lower_layers_never_import_the_runtime() -> None:
    upward = {
        f"{module_name(path)} imports {name}"
        for path in sorted(PACKAGE.rglob("*.py")) if layer(module_name(path)) in LOWER
        for name in imported(path) if layer(name) in HIGHER
    }
    assert not upward


def test_the_lower_packages_import_one_another_without_cycles() -> None:
    graph = package_imports()
    assert set().union(*graph.values()) <= set(LOWER)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(target == goal or (target not in seen and reaches(target, goal, seen | {target}))
                   for target in graph[start])

    assert not [package for package in LOWER if reaches(package, package, set())]


def test_the_config_models_load_without_the_processing_steps() -> None:
    """config.models and processing.routing used to import each other."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, streamflow.config.models; "
         "print(sorted(m for m in sys.modules if m.startswith('streamflow.processing')))"],
        capture_output=True, text=True, check=True,
    )
    assert loaded.stdout.strip() == "[]"
