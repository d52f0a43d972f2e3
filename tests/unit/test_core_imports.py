"""The core (epp/) never imports a built-in plugin: built-ins reach EPP through the ``epp.plugins`` entry point,
as an outside package's do, and the types the core needs unconfigured (the data layer's) are its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_module_of_epp_imports_plugins() -> None:
    found = []
    for path in sorted((ROOT / "epp").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in ("epp_plugins", "plugins")]
    assert found == []


def test_data_layer_types_are_known_without_the_builtin_plugins() -> None:
    """A fresh interpreter that cannot import ``epp_plugins`` still knows the data layer's types and builds the
    server's scraper defaults from them."""
    code = """
import sys
sys.modules["epp_plugins"] = None  # the built-in plugins' package: any import of it fails
from epp.scheduling.registry import registered_types
types = registered_types()
assert {"metrics-data-source", "core-metrics-extractor"} <= set(types), sorted(types)
import epp.server
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
