"""Server certificates for the ext_proc port: from ``--cert-path`` or self-signed at start-up."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


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
