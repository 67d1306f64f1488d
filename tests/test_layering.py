"""The layer rules of DESIGN.md §1: core/ and protocol/ are pure; imports only go one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "tidesync"
BANNED = {"asyncio", "sqlite3", "socket", "threading", "time", "random", "os", "secrets", "gc"}
# Which top-level tidesync packages each layer may import.
ALLOWED = {
    "core": {"core", "errors", "objectid"},
    "protocol": {"core", "protocol", "errors", "objectid"},
    "support": {"support", "errors"},
    "store": {"core", "protocol", "store", "support", "errors", "objectid"},
    # the server never imports the device's database (store/): what both use is in support/
    "server": {"core", "protocol", "server", "support", "errors", "objectid", "eventloop"},
    "client": {"core", "protocol", "store", "client", "support", "errors", "objectid", "eventloop"},
    # the backends' client talks HTTP to the server and never imports it
    "admin": {"core", "store", "admin", "errors", "objectid"},
}


def _imports(path: Path, root: Path = SRC) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    rel_pkg = path.relative_to(root).parts[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(("tidesync", *rel_pkg))[: len(rel_pkg) + 1 - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, node.lineno))
    return found


def _layer_files(layer: str) -> list[Path]:
    return sorted((SRC / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", ["core", "protocol"])
def test_pure_layers_import_no_io(layer: str) -> None:
    bad = [
        f"{p.relative_to(SRC)}:{line} imports {mod}"
        for p in _layer_files(layer)
        for mod, line in _imports(p)
        if mod.split(".")[0] in BANNED
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_follow_layer_direction(layer: str) -> None:
    bad = []
    for p in _layer_files(layer):
        for mod, line in _imports(p):
            parts = mod.split(".")
            if parts[0] == "tidesync" and len(parts) > 1 and parts[1] not in ALLOWED[layer]:
                bad.append(f"{p.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_banned_import(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    f = tmp_path / "core" / "probe.py"
    f.write_text("import time\nfrom ..store import engine\nfrom .hlc import HLC\n")
    mods = [m for m, _ in _imports(f, tmp_path)]
    assert mods == ["time", "tidesync.store", "tidesync.core.hlc"]
