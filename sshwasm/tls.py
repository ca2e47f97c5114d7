"""The certificates of a Dask pool (engine: dask): a CA of its own and one certificate per host.

`sshwasm pool up` opens ports on the hosts (the scheduler's, each worker's), so everything
talks mutual TLS: each end presents a certificate signed by the pool's CA and accepts only
peers that do. The CA is made here, on the machine that runs `pool up`, and its key never
leaves it; hosts get the CA certificate and their own key pair, copied over SSH (mode 0600).

Everything lives in a private directory per cluster file (`pool_dir`), made once and reused,
so `pool up` is idempotent and `pool status`/`run` find the client certificate again.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .errors import SshwasmError

CA_NAME = "ca"
CLIENT_NAME = "client"
# Long enough that a pool never stops for an expired certificate; renewing them all is
# removing the pool's directory (`pool_dir`) before the next `pool up`.
VALID_DAYS = 10 * 365


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PoolCertificates:
    """The CA certificate, the local client's pair, and where the hosts' pairs are kept."""

    directory: Path
    ca_cert: Path
    client: KeyPair

    def host(self, name: str) -> KeyPair:
        """The pair of host `name` (made by `ensure_host_pair`)."""
        return KeyPair(
            self.directory / "hosts" / f"{name}.pem", self.directory / "hosts" / f"{name}.key"
        )


def pool_dir(cluster_source: str) -> Path:
    """This machine's directory for the pool of one cluster file (certificates, state)."""
    key = hashlib.sha256(os.path.abspath(cluster_source).encode()).hexdigest()[:16]
    return paths.data_dir() / "pools" / key


def _write_private(path: Path, data: bytes) -> None:
    """Write `path` readable by its owner only, replacing it whole."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, paths.PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(temp, path)


def _new_key() -> object:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _save(pair: KeyPair, cert: object, key: object) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    assert isinstance(cert, x509.Certificate) and isinstance(key, ec.EllipticCurvePrivateKey)
    _write_private(
        pair.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(pair.cert, cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(pair: KeyPair, label: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = _new_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sshwasm pool CA {label}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
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
        .sign(key, hashes.SHA256())
    )
    _save(pair, cert, key)


def _load_ca(pair: KeyPair) -> tuple[object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    return cert, key


def _issue(ca: KeyPair, pair: KeyPair, common_name: str, address: str | None) -> None:
    """Sign a new key pair for `common_name` (a host at `address`, or the client)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = _load_ca(ca)
    assert isinstance(ca_cert, x509.Certificate)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _new_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # Every member both serves (scheduler, worker) and connects (to the others).
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if address is not None:
        general: x509.GeneralName
        try:
            general = x509.IPAddress(ipaddress.ip_address(address))
        except ValueError:
            general = x509.DNSName(address)
        builder = builder.add_extension(x509.SubjectAlternativeName([general]), critical=False)
    _save(pair, builder.sign(ca_key, hashes.SHA256()), key)


def ensure_certificates(cluster_source: str) -> PoolCertificates:
    """The pool's CA and the client's pair, made on first use and reused after."""
    directory = pool_dir(cluster_source)
    try:
        paths.make_private_dir(directory)
        paths.make_private_dir(directory / "hosts")
        ca = KeyPair(directory / f"{CA_NAME}.pem", directory / f"{CA_NAME}.key")
        if not (ca.cert.exists() and ca.key.exists()):
            _make_ca(ca, directory.name)
        client = KeyPair(directory / f"{CLIENT_NAME}.pem", directory / f"{CLIENT_NAME}.key")
        if not (client.cert.exists() and client.key.exists()):
            _issue(ca, client, "sshwasm client", None)
    except (OSError, ValueError) as exc:
        raise SshwasmError(f"cannot make the pool's certificates in {directory}: {exc}") from exc
    return PoolCertificates(directory, ca.cert, client)


def ensure_host_pair(certs: PoolCertificates, name: str, address: str) -> KeyPair:
    """Host `name`'s pair (at `address`), signed by the pool's CA; made once."""
    pair = certs.host(name)
    if not (pair.cert.exists() and pair.key.exists()):
        ca = KeyPair(certs.ca_cert, certs.directory / f"{CA_NAME}.key")
        try:
            _issue(ca, pair, f"sshwasm host {name}", address)
        except (OSError, ValueError) as exc:
            raise SshwasmError(f"cannot make the certificate of host '{name}': {exc}") from exc
    return pair
