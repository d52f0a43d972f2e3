"""One EPP for two pools through the real Envoy (epp.pools): each route names its pool, each pool has its own
profile, metrics carry the pool, readiness is per pool, and no request reaches the other pool's endpoints -- not
with a forged x-epp-pool, not without a route."""

from __future__ import annotations

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import PREFIX_ONLY_CONFIG
from epp.stack.local import HOST, LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS
from tests.e2e.test_operability_lifecycle import RANDOM

ROUTES = {"/a/": {"x-epp-pool": "a"}, "/b/": {"x-epp-pool": "b"}}


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def pools_file(endpoints: list[str]) -> str:
    return (f"pools:\n- name: a\n  endpoints: [{endpoints[0]}, {endpoints[1]}]\n  configText: |\n"
            f"{_indent(PREFIX_ONLY_CONFIG)}\n"
            f"- name: b\n  endpoints: [{endpoints[2]}, {endpoints[3]}]\n  configText: |\n{_indent(RANDOM)}\n")


def picks(client: httpx.Client, path: str, n: int, headers: dict[str, str] | None = None) -> list[str]:
    out = []
    for _ in range(n):
        r = client.post(path, json={"model": MODEL, "prompt": "the same prompt " * 40, "max_tokens": 2},
                        headers=headers or {})
        assert r.status_code == 200, r.text
        out.append(r.headers["x-epp-endpoint"])
    return out


def test_one_epp_two_pools_each_with_its_profile_and_no_crossing(tmp_path):
    stack = LocalStack(pods=4, sim_args=SIM_ARGS, route_headers=ROUTES)
    f = tmp_path / "pools.yaml"
    f.write_text(pools_file(stack.endpoints))
    stack.epp_args = ["--pools-file", str(f)]
    with stack, httpx.Client(base_url=stack.url, timeout=30) as client:
        a, b = set(stack.endpoints[:2]), set(stack.endpoints[2:])
        got_a = picks(client, "/a/v1/completions", 12)
        assert set(got_a) <= a and len(set(got_a)) == 1  # pool a: prefix affinity, one endpoint for one prompt
        got_b = picks(client, "/b/v1/completions", 24)
        assert set(got_b) == b  # pool b: random over its two endpoints
        # a client naming the other pool is not heard: Envoy strips its header, the route sets its own
        assert set(picks(client, "/a/v1/completions", 6, {"x-epp-pool": "b"})) <= a
        assert set(picks(client, "/b/v1/completions", 6, {"x-epp-pool": "a"})) <= b
        # no route naming a pool and no default pool: refused, whatever the client sends
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                        headers={"x-epp-pool": "a"})
        assert r.status_code == 400 and "unknown-pool" in r.text
        # metrics by pool, readiness by pool
        text = httpx.get(f"http://{HOST}:{stack.metrics_port}/metrics", timeout=10).text
        routed = {line.split('pool="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines() if line.startswith("inference_objective_request_total{")}
        assert routed == {"a": 18.0, "b": 30.0}
        with grpc.insecure_channel(f"{HOST}:{stack.health_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("pool/a", "pool/b", ""):
                assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
        check_debug_pages(f"http://{HOST}:{stack.metrics_port}", a, b)


def check_debug_pages(base: str, a: set[str], b: set[str]) -> None:
    """/debug covers every pool, each endpoint and decision labelled with its pool."""
    view = httpx.get(base + "/debug/endpoints", timeout=10).json()
    assert {(e["pool"], e["address"]) for e in view["endpoints"]} == {("a", x) for x in a} | {("b", x) for x in b}
    assert {e["pool"]: 0 for e in view["endpoints"]} == {"a": 0, "b": 0}
    picks = {name: sum(e["picks"] for e in v["endpoints"]) for name, v in view["pools"].items()}
    assert picks == {"a": 18, "b": 30} and view["decisions"] == 48
    profiles = {name: v["config"]["profiles"] for name, v in view["pools"].items()}
    assert profiles["a"] != profiles["b"]  # each pool's own scheduling configuration
    only_b = httpx.get(base + "/debug/endpoints", params={"pool": "b"}, timeout=10).json()
    assert only_b["pool"] == "b" and {e["address"] for e in only_b["endpoints"]} == b
    assert httpx.get(base + "/debug/endpoints", params={"pool": "c"}, timeout=10).status_code == 404
    recent = httpx.get(base + "/debug/decisions", params={"limit": 100}, timeout=10).json()
    refused, routed = recent["decisions"][0], recent["decisions"][1:]  # the request no route named a pool
    assert (refused["rejected"], refused["pool"]) == ("unknown-pool", None)
    assert recent["total"] == 48 and len(routed) == 48
    assert all(d["endpoint"] in (a if d["pool"] == "a" else b) for d in routed)
    times = [d["t"] for d in recent["decisions"]]
    assert times == sorted(times, reverse=True) and routed[0]["pool"] == "b"  # b's were routed last
    only_a = httpx.get(base + "/debug/decisions", params={"pool": "a", "limit": 100}, timeout=10).json()
    assert only_a["total"] == 18 and {d["endpoint"] for d in only_a["decisions"]} <= a


def test_route_metadata_names_the_pool_through_envoy(tmp_path):
    """The route names the pool in dynamic metadata (per-route set_metadata, forwarded in ext_proc's
    metadata_context), in EPP's own namespace or in envoy.lb; it wins over the header; a client sets neither."""
    routes = {"/a/": {"epp": {"pool": "a"}}, "/b/": {"envoy.lb": {"x-epp-pool": "b"}}, "/both/": {"epp": {"pool": "a"}}}
    stack = LocalStack(pods=4, sim_args=SIM_ARGS, route_metadata=routes, route_headers={"/both/": {"x-epp-pool": "b"}})
    f = tmp_path / "pools.yaml"
    f.write_text(pools_file(stack.endpoints))
    stack.epp_args = ["--pools-file", str(f)]
    with stack, httpx.Client(base_url=stack.url, timeout=30) as client:
        a, b = set(stack.endpoints[:2]), set(stack.endpoints[2:])
        assert set(picks(client, "/a/v1/completions", 4, {"x-epp-pool": "b"})) <= a
        assert set(picks(client, "/b/v1/completions", 12, {"x-epp-pool": "a"})) == b
        assert set(picks(client, "/both/v1/completions", 4)) <= a  # metadata over the header
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                        headers={"x-epp-pool": "a"})
        assert r.status_code == 400 and "unknown-pool" in r.text
