"""What TLS and node authentication need: a CA, the SuperLink's certificate, one key pair per site.

Flower's TLS is server-side only: the SuperLink holds a certificate signed by the CA and every
SuperNode verifies it with ``ca.crt``. Sites authenticate with an EC key pair (SECP384R1): the
coordinator registers each public key (OpenSSH format) and the site signs with its private key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfm.privacy.signing import write_key_pair

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(folder: Path, name: str = "fedfm federation CA") -> tuple[Path, Path]:
    """A self-signed CA: ``ca.crt`` (give to every site) and ``ca.key`` (keep at the coordinator)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "ca.key", _pem_key(key))
    return folder / "ca.crt", folder / "ca.key"


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_server_cert(folder: Path, names: list[str]) -> tuple[Path, Path]:
    """The SuperLink's ``superlink.crt`` / ``superlink.key``, signed by the CA in ``folder``.

    ``names`` are the host names and IP addresses sites use to reach the SuperLink; a site whose
    address is not among them fails TLS verification.
    """
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "superlink.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "superlink.key", _pem_key(key))
    return folder / "superlink.crt", folder / "superlink.key"


def make_node_keys(folder: Path, site: str) -> tuple[Path, Path]:
    """``<site>`` (private, OpenSSH, stays at the hospital) and ``<site>.pub`` (registered at the coordinator)."""
    return write_key_pair(folder, site)


def certificate_names(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]
