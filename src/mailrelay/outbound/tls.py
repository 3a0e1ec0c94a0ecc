"""TLS material for connections to providers: what to trust, which name to verify, which
client certificate to show.

Read once when the provider is built. The same loaders run when the config is checked
(``tls_material_error``), so a file that cannot be used is a one-line config error naming the
key, at ``check-config`` and at start, never a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from OpenSSL import crypto
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

from mailrelay.config import ProviderConfig

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL
)


class TLSMaterialError(Exception):
    """A CA, certificate or key file that cannot be used; ``key`` names the config key."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


def _no_passphrase(*_: object) -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key, and a
    # foreground ``twistd -n`` would sit there waiting.
    raise TLSMaterialError("client_key", "the private key is encrypted (not supported)")


def load_trust(ca_file: str) -> Any:
    """Every certificate of a PEM bundle, not just the first one."""
    try:
        pem = Path(ca_file).read_bytes()
    except OSError as e:
        raise TLSMaterialError("ca_file", f"cannot read {ca_file!r}: {e.strerror}") from None
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise TLSMaterialError("ca_file", f"no PEM certificate in {ca_file!r}")
    try:
        return trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
    except Exception:
        raise TLSMaterialError("ca_file", f"a certificate in {ca_file!r} is not valid") from None


def load_client_certificate(cert_file: str, key_file: str | None) -> PrivateCertificate:
    """The client certificate and its key (from ``key_file``, else from the same file)."""
    try:
        cert_pem = Path(cert_file).read_bytes()
        key_pem = Path(key_file).read_bytes() if key_file is not None else cert_pem
    except OSError as e:
        which = "client_key" if key_file is not None and e.filename == key_file else "client_cert"
        raise TLSMaterialError(which, f"cannot read {e.filename!r}: {e.strerror}") from None
    try:
        certificate = Certificate.loadPEM(cert_pem)
    except Exception:
        raise TLSMaterialError(
            "client_cert", f"no valid PEM certificate in {cert_file!r}"
        ) from None
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem, _no_passphrase)
    except TLSMaterialError:
        raise
    except Exception:
        where = key_file if key_file is not None else cert_file
        raise TLSMaterialError("client_key", f"no usable PEM private key in {where!r}") from None
    if not KeyPair(key).keyHash() == certificate.getPublicKey().keyHash():
        raise TLSMaterialError("client_key", "the private key does not match client_cert")
    private: PrivateCertificate = PrivateCertificate.fromCertificateAndKeyPair(
        certificate, KeyPair(key)
    )
    return private


def client_tls_options(provider: ProviderConfig) -> Any | None:
    """Verified TLS (chain and name, via service_identity; SNI with the same name), with the
    client certificate if one is configured; None for tls = "none"."""
    if provider.tls == "none":
        return None
    trust = load_trust(provider.ca_file) if provider.ca_file is not None else platformTrust()
    client_certificate = None
    if provider.client_cert is not None:
        client_certificate = load_client_certificate(provider.client_cert, provider.client_key)
    return optionsForClientTLS(
        provider.tls_name or provider.host,
        trustRoot=trust,
        clientCertificate=client_certificate,
    )


def tls_material_error(provider: ProviderConfig) -> TLSMaterialError | None:
    """What is wrong with the provider's TLS files, if anything (for config checks)."""
    try:
        client_tls_options(provider)
    except TLSMaterialError as e:
        return e
    return None
