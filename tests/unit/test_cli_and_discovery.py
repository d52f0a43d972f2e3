"""Flags as GIE's users write them; static discovery from a flag and from a reloaded file."""

from __future__ import annotations

import pytest

from epp.cli import parse_args
from epp.config import parse_duration
from epp.datalayer.pool import EndpointPool
from epp.datalayer.static import DiscoveryError, StaticFileDiscovery, parse_endpoint_list


def test_gie_defaults_and_go_style_flags():
    cfg = parse_args(["--static-endpoints", "10.0.0.1:8000"])
    assert (cfg.grpc_port, cfg.grpc_health_port, cfg.metrics_port) == (9002, 9003, 9090)
    assert cfg.secure_serving is True and cfg.refresh_metrics_interval == 0.05
    cfg = parse_args(["--static-endpoints=10.0.0.1:8000", "--secure-serving=false", "--refresh-metrics-interval=100ms",
                      "--drain-timeout", "1m30s", "--disable-endpoint-subset-filter", "-v", "4"])
    assert cfg.secure_serving is False and cfg.refresh_metrics_interval == pytest.approx(0.1)
    assert cfg.drain_timeout == 90 and cfg.disable_endpoint_subset_filter is True and cfg.verbosity == 4


@pytest.mark.parametrize("argv", [[], ["--static-endpoints", "a:1", "--pool-name", "p"],
                                  ["--static-endpoints", "a:1", "--secure-serving=maybe"],
                                  ["--static-endpoints", "a:1", "--config-file", "x", "--config-text", "y"],
                                  ["--static-endpoints", "a:1", "--secure-serving=false", "--client-ca-path", "ca"]])
def test_bad_flags_exit_with_usage(argv):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_durations():
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("2") == 2 and parse_duration("1h2m3s") == 3723
    with pytest.raises(ValueError):
        parse_duration("5 parsecs")


def test_endpoint_list():
    specs = parse_endpoint_list("10.0.0.1:8000, [::1]:9000,host.local:80")
    assert [(s.address, s.port) for s in specs] == [("10.0.0.1", 8000), ("::1", 9000), ("host.local", 80)]
    for bad in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:x", "a:1,a:1"):
        with pytest.raises(DiscoveryError):
            parse_endpoint_list(bad)


def test_static_file_reloads_and_keeps_objects(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("endpoints:\n- 10.0.0.1:8000\n- {address: 10.0.0.2, port: 8000, name: b, labels: {gpu: h100}}\n")
    pool = EndpointPool()
    disc = StaticFileDiscovery(pool, path)
    assert disc.load()
    first = pool.get("b")
    assert first is not None and first.labels == {"gpu": "h100"}
    first.inflight_requests = 3
    path.write_text("endpoints:\n- {address: 10.0.0.2, port: 8000, name: b}\n- 10.0.0.3:8000\n")
    assert disc.load()
    assert [e.name for e in pool.endpoints] == ["b", "10.0.0.3:8000"]
    assert pool.get("b") is first and first.inflight_requests == 3 and first.labels == {}
    path.write_text("endpoints: [not-a-hostport]\n")  # invalid: refused, previous view kept
    assert not disc.load()
    assert [e.name for e in pool.endpoints] == ["b", "10.0.0.3:8000"]
