"""No comment or docstring points at a file that is not in the repository: every path written from the
repository's root (``epp/...``, ``docs/...``, ``bench/README.md``), and every Markdown file named on its own,
exists. Paths in other projects are written with that project's name (``vllm/...`` "in vLLM")."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("epp", "plugins", "sim", "bench", "tests", "examples")
# A path from the root: one of the repository's own top-level folders (and ``reference/``, which it has not)
# then at least one more component.
ROOTED = re.compile(r"(?<![\w./-])((?:epp|plugins|sim|bench|tests|docs|manifests|examples|proto|reference)"
                    r"/[\w.-]+(?:/[\w.-]+)*)")
MARKDOWN = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")


def texts(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and \
                (doc := ast.get_docstring(node, clean=False)):
            yield node.body[0].lineno, doc


def test_paths_in_comments_exist() -> None:
    tops = [p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "build"]
    markdown = {p.name for top in tops for p in top.rglob("*.md")} | {p.name for p in ROOT.glob("*.md")}
    dangling = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue
            for line, text in texts(path):
                for ref in ROOTED.findall(text):
                    if not (ROOT / ref.rstrip(".")).exists():
                        dangling.append(f"{path.relative_to(ROOT)}:{line}: {ref}")
                dangling += [f"{path.relative_to(ROOT)}:{line}: {ref}" for ref in MARKDOWN.findall(text)
                             if ref not in markdown]
    assert dangling == []
