"""The main job on an embedded default: three simulated vLLM pods, EPP and a real Envoy on loopback,
then real requests through every API, printing which pod served each (``make demo``)."""

from __future__ import annotations

import argparse
import sys
import time

from epp.stack import dev_import
from epp.stack.envoy import envoy_binary
from epp.stack.local import LocalStack
from epp.stack.tour import MODEL, format_table, run_tour


def prefix_affinity(base_url: str, groups: int = 3, per_group: int = 4) -> list[tuple[int, str]]:
    """Requests sharing a long system prompt should land on the pod that already cached it."""
    out = []
    with dev_import("httpx").Client(base_url=base_url, timeout=30) as http:
        for g in range(groups):
            system = f"You are assistant #{g}. " + "Follow the house style guide carefully. " * 60
            for q in range(per_group):
                r = http.post("/v1/chat/completions", json={
                    "model": MODEL, "max_tokens": 4,
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Question {q}?"}]})
                cached = r.json().get("usage", {}).get("prompt_tokens_details", {}) or {}
                out.append((g, f"{r.headers.get('x-served-by')} cached_tokens={cached.get('cached_tokens', 0)}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pods", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the stack running until Ctrl-C")
    args = ap.parse_args(argv)
    try:  # what the demo needs beyond EPP's runtime dependencies, checked before anything starts
        for module in ("httpx", "openai", "anthropic"):
            dev_import(module)
        envoy_binary()
    except (ImportError, FileNotFoundError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    print(f"starting {args.pods} simulated vLLM pods, EPP and Envoy on 127.0.0.1 ...", flush=True)
    with LocalStack(pods=args.pods, sim_args=["--profile", "fast", "--model", MODEL]) as stack:
        print(f"envoy {stack.url}  ->  epp :{stack.grpc_port} (tls)  ->  pods {', '.join(stack.endpoints)}\n")
        results = run_tour(stack.url)
        print(format_table(results))
        print("\nshared-prefix chat requests (3 system prompts x 4 questions):")
        for group, where in prefix_affinity(stack.url):
            print(f"  prompt {group}: {where}")
        failed = [r for r in results if not r.ok or (r.picked and r.picked != r.served_by)]
        print(f"\n{len(results) - len(failed)}/{len(results)} APIs answered, each by the pod EPP picked"
              if not failed else f"\nFAILED: {[r.name for r in failed]}")
        if args.keep:
            print(f"stack up at {stack.url}; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
