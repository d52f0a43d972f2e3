"""Prefix-cache hit rate of a set of pods over a command: counters read before and after, from /metrics.

    python -m bench.podstats 127.0.0.1:18100,127.0.0.1:18101 -- guidellm run ...   # hit rate over the run
    python -m bench.podstats 127.0.0.1:18100,127.0.0.1:18101                        # counters so far

For load tools that do not compute a hit rate themselves (or compute it from client-side usage fields only).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

import aiohttp

from bench.harness import SimPods


async def read(endpoints: list[str]) -> dict[str, float]:
    pods = SimPods.__new__(SimPods)  # only its HTTP helpers
    pods.endpoints = endpoints
    async with aiohttp.ClientSession() as http:
        return await pods.counters(http)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("endpoints", help="host:port of every pod, comma-separated")
    a = ap.parse_args(argv)
    endpoints = a.endpoints.split(",")
    before = asyncio.run(read(endpoints)) if command else dict.fromkeys(("queries", "hits", "preemptions"), 0.0)
    rc = subprocess.call(command) if command else 0
    after = asyncio.run(read(endpoints))
    q, h = after["queries"] - before["queries"], after["hits"] - before["hits"]
    print(f"pods {len(endpoints)}: prefix-cache queries {q:.0f} tokens, hits {h:.0f} tokens, "
          f"hit rate {100 * h / q if q else 0:.1f}%, preemptions {after['preemptions'] - before['preemptions']:.0f}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
