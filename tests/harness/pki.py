"""A throw-away PKI for the tests: a CA, a server certificate, client certificates.

Made with `cryptography` at session start, never committed. EC P-256 keys (fast to make),
private keys written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TestPKI:
    __test__ = False  # not a pytest test class

    directory: Path
    ca: Path
    server: CertFiles
    clients: dict[str, CertFiles]
    rogue_ca: Path
    rogue_client: CertFiles
    ca_key: Path | None = None  # the CA's private key, for issue_cert (tests only)

    def client(self, name: str) -> CertFiles:
        return self.clients[name]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dimse-relay tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    *,
    server: bool,
    client: bool | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate: serverAuth (with loopback SANs) if ``server``, clientAuth if
    ``client`` (default: not ``server``); both for a NATS route certificate."""
    if client is None:
        client = not server
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(usages),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(
    directory: Path, client_names: tuple[str, ...] = ("edge", "cloud", "tester")
) -> TestPKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca("dimse-relay test CA")
    ca_path = directory / "ca.pem"
    _write_cert(ca_path, ca_cert)
    ca_key_path = directory / "ca-key.pem"
    _write_key(ca_key_path, ca_key)

    def issue(cn: str, server: bool, key_ca=ca_key, cert_ca=ca_cert) -> CertFiles:
        key, cert = _issue(key_ca, cert_ca, cn, server=server)
        files = CertFiles(directory / f"{cn}.pem", directory / f"{cn}-key.pem")
        _write_cert(files.cert, cert)
        _write_key(files.key, key)
        return files

    server = issue("nats-server", True)
    clients = {n: issue(n, False) for n in client_names}

    rogue_key, rogue_cert = _make_ca("rogue CA")
    rogue_ca = directory / "rogue-ca.pem"
    _write_cert(rogue_ca, rogue_cert)
    rogue_client = issue("rogue-client", False, rogue_key, rogue_cert)
    return TestPKI(directory, ca_path, server, clients, rogue_ca, rogue_client, ca_key_path)


def issue_cert(pki: TestPKI, cn: str, *, server: bool, client: bool) -> CertFiles:
    """One more certificate from the test CA, e.g. a NATS route certificate (serverAuth and
    clientAuth, SANs localhost and 127.0.0.1), written next to the others."""
    if pki.ca_key is None:
        raise ValueError("this TestPKI was made without its CA key")
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    key, cert = _issue(ca_key, ca_cert, cn, server=server, client=client)
    files = CertFiles(pki.directory / f"{cn}.pem", pki.directory / f"{cn}-key.pem")
    _write_cert(files.cert, cert)
    _write_key(files.key, key)
    return files
