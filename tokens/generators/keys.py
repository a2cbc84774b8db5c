"""Keys and certificates given as PEM text in a provider's secret: parsed and checked with
cryptography, handed to joserfc (JWTs) or OpenSSL (mutual TLS). Problems come back as one line
safe to show in a form: never a piece of the key."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

# The JWS algorithms a private key may sign with, by key type; and a shared secret's.
KEY_ALGORITHMS = ("RS256", "PS256", "ES256")
SECRET_ALGORITHMS = ("HS256", "HS384", "HS512")
MIN_RSA_BITS = 2048
PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----[\s\S]+?-----END \1-----")


class KeyProblem(ValueError):
    """The secret does not hold a usable key (the message says why, without the key)."""


@dataclass(frozen=True)
class PemBundle:
    """The private key and the certificate (if any) of a PEM secret."""

    key_pem: str = field(repr=False)
    certificate_pem: str | None = field(default=None, repr=False)

    @property
    def certificate_thumbprint(self) -> str | None:
        """``x5t#S256``: base64url of the SHA-256 of the certificate's DER, unpadded."""
        if self.certificate_pem is None:
            return None
        der = x509.load_pem_x509_certificate(self.certificate_pem.encode()).public_bytes(
            serialization.Encoding.DER
        )
        return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def pem_bundle(text: object, *, certificate_required: bool = False) -> PemBundle:
    """The private key (and certificate) in ``text``; KeyProblem when there is none, when it
    is encrypted, or when the certificate is not the key's."""
    if not isinstance(text, str) or "-----BEGIN" not in text:
        raise KeyProblem("must be PEM text of a private key (-----BEGIN PRIVATE KEY-----)")
    keys = [m.group(0) for m in PEM_BLOCK.finditer(text) if "PRIVATE KEY" in m.group(1)]
    certificates = [m.group(0) for m in PEM_BLOCK.finditer(text) if m.group(1) == "CERTIFICATE"]
    if len(keys) != 1:
        raise KeyProblem("must hold exactly one PEM private key")
    if len(certificates) > 1:
        raise KeyProblem("must hold at most one certificate (the client's own)")
    if certificate_required and not certificates:
        raise KeyProblem("must hold the client certificate (PEM) as well as its private key")
    private = _load_private(keys[0])
    certificate = certificates[0] if certificates else None
    if certificate is not None:
        try:
            cert = x509.load_pem_x509_certificate(certificate.encode())
        except ValueError:
            raise KeyProblem("holds a certificate that cannot be read") from None
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise KeyProblem("holds a certificate that is not the private key's")
    return PemBundle(key_pem=keys[0], certificate_pem=certificate)


def _load_private(pem: str) -> Any:
    if "ENCRYPTED" in pem:
        raise KeyProblem("holds an encrypted private key: give it without a passphrase")
    try:
        return serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise KeyProblem("holds a private key that cannot be read") from None
    except Exception:  # cryptography's UnsupportedAlgorithm and kin
        raise KeyProblem("holds a private key of an unsupported type") from None


def check_algorithm(key_pem: str, algorithm: str) -> str | None:
    """The problem with signing by ``algorithm`` with the key, or None when they fit."""
    private = _load_private(key_pem)
    if algorithm in ("RS256", "PS256"):
        if not isinstance(private, rsa.RSAPrivateKey):
            return f"{algorithm} needs an RSA private key"
        if private.key_size < MIN_RSA_BITS:
            return f"an RSA key must have at least {MIN_RSA_BITS} bits"
        return None
    if algorithm == "ES256":
        if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
            private.curve, ec.SECP256R1
        ):
            return "ES256 needs an EC private key on the P-256 curve"
        return None
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "Ed25519 keys are not supported"
    return f"algorithm must be one of {', '.join(KEY_ALGORITHMS)}"


def default_algorithm(key_pem: str) -> str:
    """RS256 for an RSA key, ES256 for an EC key."""
    return "ES256" if isinstance(_load_private(key_pem), ec.EllipticCurvePrivateKey) else "RS256"


def jwk_of(key_pem: str) -> RSAKey | ECKey:
    """The key for joserfc."""
    private = _load_private(key_pem)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(key_pem)
    return RSAKey.import_key(key_pem)


def sign_jwt(
    *, key_pem: str, algorithm: str, claims: Mapping[str, Any], header: Mapping[str, Any]
) -> str:
    """A compact JWS of ``claims`` signed with the private key (joserfc)."""
    return jwt.encode(
        {**header, "alg": algorithm, "typ": "JWT"},
        dict(claims),
        jwk_of(key_pem),
        algorithms=[algorithm],
    )


def shared_key(secret: str) -> OctKey:
    """A client secret as an HMAC key (client_secret_jwt)."""
    return OctKey.import_key(secret)


@dataclass(frozen=True)
class ServiceAccount:
    """The parts of a Google service-account JSON key that the JWT bearer grant uses."""

    client_email: str
    private_key: str = field(repr=False)
    private_key_id: str | None
    token_uri: str | None


def service_account(secret: str) -> ServiceAccount | None:
    """The service account in ``secret`` when it is a Google JSON key, else None; KeyProblem
    when it looks like one but is not whole."""
    text = secret.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        raise KeyProblem("looks like a JSON key file but is not valid JSON") from None
    if not isinstance(data, dict) or data.get("type") != "service_account":
        raise KeyProblem('a JSON key must be a service account key ("type": "service_account")')
    email, key = data.get("client_email"), data.get("private_key")
    if not isinstance(email, str) or not email or not isinstance(key, str):
        raise KeyProblem("the service account key has no client_email or private_key")
    key_id, token_uri = data.get("private_key_id"), data.get("token_uri")
    return ServiceAccount(
        client_email=email,
        private_key=key,
        private_key_id=key_id if isinstance(key_id, str) and key_id else None,
        token_uri=token_uri if isinstance(token_uri, str) and token_uri else None,
    )
