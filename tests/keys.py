"""Key material for tests: PEM private keys, a tiny certificate authority, self-signed certificates.

Keys are cached by name for the process (RSA generation is slow): ``rsa_key_pem()`` is always the
same key, ``rsa_key_pem("other")`` a different one.
"""

from __future__ import annotations

import base64
import datetime
import functools
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=2)
_BACKDATE = datetime.timedelta(hours=1)  # tolerate a clock a little behind


def _private_pem(key: CertificateIssuerPrivateKeyTypes) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _load_private(private_pem: str) -> CertificateIssuerPrivateKeyTypes:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TypeError(f"not an RSA or EC private key: {type(key).__name__}")
    return key


@functools.cache
def rsa_key_pem(name: str = "default") -> str:
    """A 2048-bit RSA private key, PKCS#8 PEM; the same one for the same ``name``."""
    return _private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@functools.cache
def ec_key_pem(name: str = "default") -> str:
    """A P-256 private key, PKCS#8 PEM; the same one for the same ``name``."""
    return _private_pem(ec.generate_private_key(ec.SECP256R1()))


def public_pem(private_pem: str) -> str:
    """The SubjectPublicKeyInfo PEM of a private key."""
    return (
        _load_private(private_pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: str, public_key: CertificatePublicKeyTypes
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
    )


def _cert_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def self_signed_cert(key_pem: str, common_name: str) -> str:
    """A self-signed certificate (PEM) for the given private key (RSA or EC)."""
    key = _load_private(key_pem)
    builder = _builder(common_name, common_name, key.public_key())
    return _cert_pem(builder.sign(key, hashes.SHA256()))


def x5t_s256(cert_pem: str) -> str:
    """The ``x5t#S256`` thumbprint: base64url(SHA-256(DER of the certificate)), unpadded."""
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return base64.urlsafe_b64encode(digest.finalize()).rstrip(b"=").decode()


class TestCA:
    """A certificate authority for one test run: issues server and client certificates (P-256)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, name: str = "Tokens Test CA") -> None:
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.key_pem = _private_pem(self._key)
        public_key = self._key.public_key()
        builder = (
            _builder(name, name, public_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        self.cert_pem = _cert_pem(builder.sign(self._key, hashes.SHA256()))

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    ) -> tuple[str, str]:
        """``(cert_pem, key_pem)`` of a new leaf: a server certificate (serverAuth, SAN ``hosts``)
        or a client certificate (clientAuth)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(common_name, self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if server:
            names = [_san(host) for host in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _cert_pem(builder.sign(self._key, hashes.SHA256())), _private_pem(key)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
