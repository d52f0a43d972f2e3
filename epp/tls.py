"""Server certificates for the ext_proc port: from ``--cert-path`` or self-signed at start-up, and reloaded
when the files change with ``--enable-cert-reload``. With ``--client-ca-path`` the port also requires a
client certificate signed by that CA (mutual TLS: only the gateway may open ext_proc streams); the CA is
reloaded with the pair."""

from __future__ import annotations

import datetime
import logging
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)


def self_signed(common_name: str = "epp") -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM), valid one year, for localhost and the given name."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name), x509.DNSName("localhost")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load_pair(cert_dir: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) from ``tls.key`` / ``tls.crt``, as Kubernetes TLS secrets mount them."""
    d = Path(cert_dir)
    return (d / "tls.key").read_bytes(), (d / "tls.crt").read_bytes()


def load_client_ca(path: str) -> bytes:
    """PEM CA certificate(s) clients must chain to: the file ``path``, or ``ca.crt`` in the directory ``path``
    (as a Kubernetes TLS Secret from cert-manager mounts it). ValueError if it holds no certificate."""
    p = Path(path)
    if p.is_dir():
        p = p / "ca.crt"
    pem = p.read_bytes()
    try:
        if not x509.load_pem_x509_certificates(pem):
            raise ValueError("no certificate")
    except ValueError as e:
        raise ValueError(f"{p}: not a PEM CA certificate ({e})") from None
    return pem


def _check_pair(key_pem: bytes, cert_pem: bytes) -> None:
    """Raise ValueError unless the key and the certificate parse and belong together."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise ValueError("tls.key does not match the certificate in tls.crt")


class CertReloader:
    """The key pair in ``cert_dir`` (and the client CA), swapped when the files change.

    ``context()`` is asked before every new TLS handshake; it looks at the files' mtimes and sizes at most
    every ``min_interval`` seconds and builds a new context only when they changed and the new pair is valid
    (both files parse and the key matches the certificate), so a rotation caught half way (``tls.crt``
    written, ``tls.key`` not yet) keeps serving the old pair until both are in place. Connections already
    open keep the certificate they were set up with.
    """

    def __init__(self, cert_dir: str, min_interval: float = 1.0, client_ca_path: str = "") -> None:
        self.dir = Path(cert_dir)
        self.client_ca_path = client_ca_path
        self.min_interval = min_interval
        self._checked = 0.0
        self._stamp = self._file_stamp()
        key, cert = load_pair(cert_dir)
        _check_pair(key, cert)
        self.cert_pem = cert
        self.client_ca = load_client_ca(client_ca_path) if client_ca_path else None
        self._context = ssl_context(key, cert, self.client_ca)
        self.reloads = 0

    def _file_stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        files = [self.dir / "tls.crt", self.dir / "tls.key"]
        if self.client_ca_path:
            ca = Path(self.client_ca_path)
            files.append(ca / "ca.crt" if ca.is_dir() else ca)
        for path in files:
            try:
                st = path.stat()  # follows the symlinks Kubernetes swaps on secret updates
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked < self.min_interval:
            return self._context
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return self._context
        try:
            key, cert = load_pair(str(self.dir))
            _check_pair(key, cert)
            client_ca = load_client_ca(self.client_ca_path) if self.client_ca_path else None
            context = ssl_context(key, cert, client_ca)
        except (OSError, ValueError, ssl.SSLError) as e:  # half-written rotation: try again on a later handshake
            log.warning("certificate in %s not reloaded yet: %s", self.dir, e)
            return self._context
        self._stamp = stamp
        self.cert_pem = cert
        self.client_ca = client_ca
        self._context = context
        self.reloads += 1
        log.info("certificate reloaded from %s", self.dir)
        return context


def ssl_context(key_pem: bytes, cert_pem: bytes, client_ca: bytes | None = None) -> ssl.SSLContext:
    """A TLS server context for HTTP/2 (ALPN ``h2``), requiring a client certificate from ``client_ca`` when
    given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as d:  # load_cert_chain reads files only; the directory is 0700
        cert_file, key_file = Path(d) / "tls.crt", Path(d) / "tls.key"
        cert_file.write_bytes(cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca.decode())
    return ctx


def server_tls(cert_path: str = "", reload: bool = False,
               client_ca_path: str = "") -> tuple[Callable[[], ssl.SSLContext], CertReloader | None]:
    """The TLS context for each new connection to the ext_proc port: self-signed when ``cert_path`` is empty,
    the pair in ``cert_path`` otherwise, reloaded on change when ``reload`` (``--enable-cert-reload``). With
    ``client_ca_path`` (``--client-ca-path``) a client must present a certificate that CA signed, or the
    handshake fails. The reloader is returned so the caller can keep a reference (and tests can look at it)."""
    if reload and cert_path:
        reloader = CertReloader(cert_path, client_ca_path=client_ca_path)
        return reloader.context, reloader
    key, cert = load_pair(cert_path) if cert_path else self_signed()
    context = ssl_context(key, cert, load_client_ca(client_ca_path) if client_ca_path else None)
    return lambda: context, None
