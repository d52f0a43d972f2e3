"""TLS on the ext_proc port (on by default, as GIE): Envoy talks TLS to EPP, a plaintext client cannot,
``--cert-path`` serves the given certificate, and ``--enable-cert-reload`` swaps it when the files change."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp import tls
from epp.health import HealthServicer
from epp.stack.local import HOST, LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

CHAT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"


def served_cert(port: int) -> bytes:
    """The DER certificate a TLS server on ``port`` presents (not verified: we compare it ourselves)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((HOST, port), timeout=10) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der
    return der


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def write_pair(directory: Path, name: str) -> bytes:
    key, cert = tls.self_signed(name)
    for file, data in (("tls.key", key), ("tls.crt", cert)):  # atomic per file, as a secret update is
        tmp = directory / f".{file}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / file)
    return cert


def health_check(port: int, credentials: grpc.ChannelCredentials | None, timeout: float = 5.0) -> int:
    target = f"{HOST}:{port}"
    options = [("grpc.ssl_target_name_override", "localhost")]
    with (grpc.secure_channel(target, credentials, options) if credentials else grpc.insecure_channel(target)) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=EXT_PROC),
                                                    timeout=timeout).status


# -- the default stack: self-signed TLS ---------------------------------------------------------------


def test_envoy_talks_tls_to_epp(stack):
    r = httpx.post(stack.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200 and r.headers["x-epp-endpoint"] == r.headers["x-served-by"]
    assert stack.envoy is not None
    stats = stack.envoy.admin_get("/stats?filter=^cluster\\.epp\\.ssl\\.handshake$") or ""
    handshakes = int(stats.rpartition(":")[2].strip() or 0)
    assert handshakes >= 1, stats


def test_plaintext_client_cannot_talk_to_the_tls_port(stack):
    with pytest.raises(grpc.RpcError) as info:
        health_check(stack.grpc_port, None, timeout=3)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # Raw HTTP/2 cleartext: the server wants a TLS ClientHello and closes (or answers a TLS alert).
    with socket.create_connection((HOST, stack.grpc_port), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        try:
            reply = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert not reply.startswith(b"\x00\x00"), reply[:20]  # no HTTP/2 SETTINGS frame came back
    # The same port with TLS and the certificate it serves as the trust root: SERVING.
    root = ssl.DER_cert_to_PEM_cert(served_cert(stack.grpc_port)).encode()
    assert health_check(stack.grpc_port, grpc.ssl_channel_credentials(root)) == health_pb2.HealthCheckResponse.SERVING


# -- --cert-path ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    write_pair(d, "epp-given-cert")
    return d


@pytest.fixture(scope="module")
def cert_stack(cert_dir) -> Iterator[LocalStack]:
    with LocalStack(pods=1, sim_args=SIM_ARGS, epp_args=["--cert-path", str(cert_dir),
                                                         "--enable-cert-reload"]) as s:
        yield s


def test_the_given_certificate_is_the_one_served(cert_stack, cert_dir):
    assert served_cert(cert_stack.grpc_port) == der_of((cert_dir / "tls.crt").read_bytes())
    r = httpx.post(cert_stack.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200 and r.headers["x-epp-endpoint"] == r.headers["x-served-by"]
    trusted = grpc.ssl_channel_credentials((cert_dir / "tls.crt").read_bytes())
    assert health_check(cert_stack.grpc_port, trusted) == health_pb2.HealthCheckResponse.SERVING


def test_enable_cert_reload_serves_the_new_certificate(cert_stack, cert_dir):
    new = write_pair(cert_dir, "epp-rotated-cert")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and served_cert(cert_stack.grpc_port) != der_of(new):
        time.sleep(0.3)
    assert served_cert(cert_stack.grpc_port) == der_of(new)
    r = httpx.post(cert_stack.url + "/v1/chat/completions", json=CHAT, timeout=30)  # Envoy reconnects fine
    assert r.status_code == 200


# -- the reloader itself, in-process ----------------------------------------------------------------------


async def test_reloader_swaps_valid_pairs_and_keeps_serving_through_a_half_written_rotation(tmp_path):
    first = write_pair(tmp_path, "first")
    creds, reloader = tls.server_credentials(str(tmp_path), reload=True)
    assert reloader is not None
    reloader.min_interval = 0.0
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(lambda: True), server)
    port = server.add_secure_port(f"{HOST}:0", creds)
    await server.start()
    try:
        async def current() -> bytes:
            return await asyncio.to_thread(served_cert, port)

        assert await current() == der_of(first)
        # Half a rotation: a new certificate next to the old key. Not loadable: the old pair stays.
        key2, cert2 = tls.self_signed("second")
        (tmp_path / "tls.crt").write_bytes(cert2)
        assert await current() == der_of(first)
        (tmp_path / "tls.key").write_bytes(key2)  # the rotation completes
        assert await current() == der_of(cert2)
        assert reloader.reloads == 1
        # Garbage in the files: ignored, the last good pair keeps being served.
        (tmp_path / "tls.crt").write_bytes(b"not a certificate")
        assert await current() == der_of(cert2)
    finally:
        await server.stop(0)
