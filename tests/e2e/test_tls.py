"""TLS on the ext_proc port (on by default, as GIE): Envoy talks TLS to EPP, a plaintext client cannot,
``--cert-path`` serves the given certificate, and ``--enable-cert-reload`` swaps it when the files change.

Verified both ways, with certificates made here by a test CA: Envoy checks EPP's certificate (CA and DNS
name, through SDS files it reloads) and refuses an EPP it cannot verify; with ``--client-ca-path`` EPP
requires a client certificate from that CA (mutual TLS): a client without one, or with one from another
CA, is refused, and Envoy presenting its own routes as usual."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp import tls
from epp.extproc import h2grpc
from epp.extproc.servicer import ExtProcServicer
from epp.extproc.stream import StreamOptions
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


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class CA:
    """A test certificate authority, as cert-manager's CA Issuer (manifests/cert-manager) would be."""

    name: str = "test-ca"

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *dns_names: str, client: bool = False) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) for a server (or, ``client``, a client) with these DNS names."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return _pem(key), cert.public_bytes(serialization.Encoding.PEM)

    def secret_dir(self, directory: Path, *dns_names: str, client: bool = False) -> Path:
        """A directory laid out as cert-manager's Secret mounts: ca.crt, tls.crt, tls.key."""
        directory.mkdir(parents=True, exist_ok=True)
        key, cert = self.issue(*dns_names, client=client)
        for file, data in (("ca.crt", self.pem), ("tls.key", key), ("tls.crt", cert)):
            _atomic_write(directory / file, data)
        return directory


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_pair(directory: Path, name: str, ca: CA | None = None) -> bytes:
    """A key pair in tls.key / tls.crt: self-signed for ``name``, or issued by ``ca`` for ``name``, ``epp`` and
    ``localhost``."""
    key, cert = ca.issue(name, "epp", "localhost") if ca else tls.self_signed(name)
    for file, data in (("tls.key", key), ("tls.crt", cert)):  # atomic per file, as a secret update is
        _atomic_write(directory / file, data)
    return cert


def health_check(port: int, credentials: grpc.ChannelCredentials | None, timeout: float = 5.0) -> int:
    target = f"{HOST}:{port}"
    # A fresh connection every time: no subchannel shared with an earlier channel (and its handshake).
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
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


# -- --cert-path, verified by Envoy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory, ca) -> Path:
    d = tmp_path_factory.mktemp("certs")
    write_pair(d, "epp-given-cert", ca)
    return d


@pytest.fixture(scope="module")
def envoy_tls_dir(tmp_path_factory, ca) -> Path:
    """What Envoy mounts: the CA that signs EPP's certificate, and Envoy's own client certificate."""
    return ca.secret_dir(tmp_path_factory.mktemp("envoy-tls"), "gateway", client=True)


@pytest.fixture(scope="module")
def cert_stack(cert_dir, envoy_tls_dir) -> Iterator[LocalStack]:
    """EPP serves a CA-issued certificate (reloaded on change); Envoy verifies it: CA and the name ``epp``."""
    with LocalStack(pods=1, sim_args=SIM_ARGS, epp_args=["--cert-path", str(cert_dir), "--enable-cert-reload"],
                    extproc_tls_dir=str(envoy_tls_dir)) as s:
        yield s


def ssl_stats(stack: LocalStack) -> dict[str, int]:
    assert stack.envoy is not None
    text = stack.envoy.admin_get("/stats?filter=^cluster\\.epp\\.ssl\\.") or ""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.removeprefix("cluster.epp.ssl.")] = int(value)
    return out


def test_envoy_verifies_the_epp_certificate(cert_stack):
    assert cert_stack.envoy is not None
    cluster = json.dumps(cert_stack.envoy.admin_get("/config_dump?resource=static_clusters") or "")
    assert "match_typed_subject_alt_names" in cluster and "epp-ca" in cluster  # not an empty validation context
    r = httpx.post(cert_stack.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200 and r.headers["x-epp-endpoint"] == r.headers["x-served-by"]
    stats = ssl_stats(cert_stack)
    assert stats["handshake"] >= 1 and stats["fail_verify_error"] == stats["fail_verify_san"] == 0, stats


def test_the_given_certificate_is_the_one_served(cert_stack, cert_dir):
    assert served_cert(cert_stack.grpc_port) == der_of((cert_dir / "tls.crt").read_bytes())
    r = httpx.post(cert_stack.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200 and r.headers["x-epp-endpoint"] == r.headers["x-served-by"]
    trusted = grpc.ssl_channel_credentials((cert_dir / "tls.crt").read_bytes())
    assert health_check(cert_stack.grpc_port, trusted) == health_pb2.HealthCheckResponse.SERVING


def test_enable_cert_reload_serves_the_new_certificate(cert_stack, cert_dir, ca):
    new = write_pair(cert_dir, "epp-rotated-cert", ca)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and served_cert(cert_stack.grpc_port) != der_of(new):
        time.sleep(0.3)
    assert served_cert(cert_stack.grpc_port) == der_of(new)
    r = httpx.post(cert_stack.url + "/v1/chat/completions", json=CHAT, timeout=30)  # Envoy reconnects fine
    assert r.status_code == 200


@pytest.mark.parametrize("wrong", ["ca", "name"])
def test_envoy_refuses_an_epp_it_cannot_verify(tmp_path, envoy_tls_dir, ca, wrong):
    """An EPP whose certificate another CA signed, or that lacks the expected name: Envoy never sends it a
    request (fail-closed: the client gets an error, no pod is reached)."""
    epp_dir = tmp_path / "epp"
    epp_dir.mkdir()
    if wrong == "ca":
        write_pair(epp_dir, "impostor", CA("other-ca"))
    else:
        key, cert = ca.issue("not-epp.example", "localhost")
        (epp_dir / "tls.key").write_bytes(key)
        (epp_dir / "tls.crt").write_bytes(cert)
    stack = LocalStack(pods=1, sim_args=SIM_ARGS, epp_args=["--cert-path", str(epp_dir)],
                       extproc_tls_dir=str(envoy_tls_dir))
    try:
        stack.start_sim()
        stack.start_epp()
        stack.start_envoy(wait_healthy=False)
        r = httpx.post(stack.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code >= 500 and "x-served-by" not in r.headers, (r.status_code, r.text[:200])
        stats = ssl_stats(stack)
        assert stats["fail_verify_error" if wrong == "ca" else "fail_verify_san"] >= 1, stats
        assert stats["handshake"] == 0, stats
    finally:
        stack.cleanup()


# -- --client-ca-path: mutual TLS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_stack(cert_dir, envoy_tls_dir, ca) -> Iterator[LocalStack]:
    """EPP requires a client certificate from the CA (given as a file here; a directory with ca.crt works
    too); Envoy verifies EPP and presents its own."""
    ca_file = cert_dir.parent / "client-ca.crt"
    ca_file.write_bytes(ca.pem)
    with LocalStack(pods=1, sim_args=SIM_ARGS,
                    epp_args=["--cert-path", str(cert_dir), "--client-ca-path", str(ca_file)],
                    extproc_tls_dir=str(envoy_tls_dir), envoy_client_cert=True) as s:
        yield s


def client_credentials(ca: CA, client: CA | None) -> grpc.ChannelCredentials:
    """Trusts ``ca`` for the server; presents a client certificate issued by ``client`` (none if None)."""
    if client is None:
        return grpc.ssl_channel_credentials(ca.pem)
    key, cert = client.issue("some-client", client=True)
    return grpc.ssl_channel_credentials(ca.pem, private_key=key, certificate_chain=cert)


def test_mtls_envoy_with_a_client_certificate_routes_through_epp(mtls_stack):
    assert "mutual tls" in (mtls_stack.epp.tail() if mtls_stack.epp else "")
    with httpx.Client(base_url=mtls_stack.url, timeout=30) as c:
        for _ in range(3):
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.headers["x-epp-endpoint"] == r.headers["x-served-by"], r.text[:200]
    assert ssl_stats(mtls_stack)["handshake"] >= 1


@pytest.mark.parametrize("client", ["none", "other-ca"])
def test_mtls_refuses_a_client_without_a_certificate_from_the_ca(mtls_stack, ca, client):
    creds = client_credentials(ca, None if client == "none" else CA("other-ca"))
    with pytest.raises(grpc.RpcError) as info:
        health_check(mtls_stack.grpc_port, creds, timeout=3)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_mtls_accepts_a_client_certificate_from_the_ca(mtls_stack, ca):
    creds = client_credentials(ca, ca)
    assert health_check(mtls_stack.grpc_port, creds) == health_pb2.HealthCheckResponse.SERVING


def test_envoy_without_a_client_certificate_is_refused_by_mtls_epp(tmp_path, cert_dir, ca):
    stack = LocalStack(pods=1, sim_args=SIM_ARGS, epp_args=["--cert-path", str(cert_dir), "--client-ca-path",
                                                            str(ca.secret_dir(tmp_path / "ca", "unused"))],
                       extproc_tls_dir=str(ca.secret_dir(tmp_path / "envoy", "gateway", client=True)))
    try:
        stack.start_sim()
        stack.start_epp()
        stack.start_envoy(wait_healthy=False)  # verifies EPP, but presents no certificate
        r = httpx.post(stack.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code >= 500 and "x-served-by" not in r.headers, (r.status_code, r.text[:200])
    finally:
        stack.cleanup()


# -- the reloader itself, in-process ----------------------------------------------------------------------


async def _health_server(context) -> tuple[h2grpc.Server, int]:  # type: ignore[no-untyped-def]
    """EPP's ext_proc-port server (health only) with the reloader's per-connection TLS context."""
    servicer = ExtProcServicer(None, StreamOptions())  # type: ignore[arg-type]  # no Process stream is opened
    server = h2grpc.Server(servicer.methods(HealthServicer(lambda: True)), tls=context)
    return server, await server.start(HOST, 0)


async def test_reloader_swaps_valid_pairs_and_keeps_serving_through_a_half_written_rotation(tmp_path):
    first = write_pair(tmp_path, "first")
    context, reloader = tls.server_tls(str(tmp_path), reload=True)
    assert reloader is not None
    reloader.min_interval = 0.0
    server, port = await _health_server(context)
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


async def test_reloader_reloads_the_client_ca_with_the_pair(tmp_path):
    """--client-ca-path with --enable-cert-reload: a new CA in the Secret (ca.crt beside tls.crt, as
    cert-manager writes it) applies to new connections; clients of the old CA are refused from then on."""
    old, new = CA("old-ca"), CA("new-ca")
    old.secret_dir(tmp_path, "epp", "localhost")
    context, reloader = tls.server_tls(str(tmp_path), reload=True, client_ca_path=str(tmp_path))
    assert reloader is not None
    reloader.min_interval = 0.0
    server, port = await _health_server(context)
    try:
        def check(server_ca: CA, client: CA | None) -> int | grpc.StatusCode:
            try:
                return health_check(port, client_credentials(server_ca, client), timeout=3)
            except grpc.RpcError as e:
                return e.code()

        serving = health_pb2.HealthCheckResponse.SERVING
        assert await asyncio.to_thread(check, old, old) == serving
        assert await asyncio.to_thread(check, old, None) != serving  # no client certificate
        new.secret_dir(tmp_path, "epp", "localhost")  # the Secret renewed under a new CA
        assert await asyncio.to_thread(check, new, new) == serving
        assert await asyncio.to_thread(check, new, old) != serving
        assert reloader.reloads == 1
    finally:
        await server.stop(0)
