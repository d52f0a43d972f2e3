"""Measure the simulator's own CPU cost per request: `python -m epp_sim.selfbench [--stream] [--requests N]`.

Starts `python -m epp_sim` as a child process, drives it from this process with an aiohttp client, and reads
the child's user+system CPU time from /proc before and after the load (Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import aiohttp


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp_sim", "--pods", str(args.pods), "--base-port", "0", "--profile", args.profile,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode().strip()
        urls = [f"http://{a}" for a in line.removeprefix("sim ready ").split(",")]
        words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do",
                 "eiusmod", "tempor"]
        sem = asyncio.Semaphore(args.concurrency)
        tokens = 0

        async def one(session: aiohttp.ClientSession, i: int) -> None:
            nonlocal tokens
            # a shared system prompt plus a unique question, like a chat workload
            text = " ".join(words[(i + k) % len(words)] for k in range(args.prompt_words))
            body = {"messages": [{"role": "system", "content": " ".join(words) * 20},
                                 {"role": "user", "content": f"{i} {text}"}],
                    "max_tokens": args.output_tokens, "stream": args.stream}
            async with sem, session.post(urls[i % len(urls)] + "/v1/chat/completions", json=body) as r:
                if args.stream:
                    async for chunk in r.content:
                        if chunk.startswith(b"data: {"):
                            tokens += 1
                else:
                    doc = await r.json()
                    tokens += doc["usage"]["completion_tokens"]

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(session, i) for i in range(min(20, args.requests))))  # warm up
            tokens = 0
            cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
            await asyncio.gather(*(one(session, i) for i in range(args.requests)))
            cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        cpu = cpu1 - cpu0
        return {"requests": args.requests, "stream": args.stream, "output_tokens_each": args.output_tokens,
                "wall_s": round(t1 - t0, 3), "sim_cpu_s": round(cpu, 3),
                "sim_cpu_us_per_request": round(cpu / args.requests * 1e6, 1),
                "sim_cpu_us_per_token_event": round(cpu / max(tokens, 1) * 1e6, 2),
                "requests_per_s": round(args.requests / (t1 - t0), 1)}
    finally:
        proc.terminate()
        await proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m epp_sim.selfbench")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--pods", type=int, default=3)
    ap.add_argument("--profile", default="fast")
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--stream", action="store_true")
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
