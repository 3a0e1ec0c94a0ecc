"""A test PKI made with trustme: PEM files on disk for upstreams and providers.

    pki = session_pki()                # one per test session, created on first use
    pki.ca_file                        # the CA a provider trusts (ca_file = ...)
    pki.server("valid")                # ServerCert(chain=..., key=...) for UpstreamProcess
    pki.server("untrusted")            # signed by another CA, which nobody trusts
    pki.server("wrong_name")           # trusted, but only for mail.example.com
    pki.server("expired")              # trusted and right name, expired yesterday
    pki.client                         # ClientCert for mutual TLS (signed by the same CA)

"valid", "untrusted" and "expired" certificates name "localhost" and 127.0.0.1 (and ::1).
`chain` holds the private key and the certificate chain (the form the upstream loads with
``load_cert_chain(chain, key)``); `key` holds the key alone.
"""

from __future__ import annotations

import datetime
import functools
import tempfile
from pathlib import Path
from typing import Literal

import attrs
import trustme

ServerKind = Literal["valid", "untrusted", "wrong_name", "expired"]
SERVER_KINDS: tuple[ServerKind, ...] = ("valid", "untrusted", "wrong_name", "expired")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WRONG_NAME = "mail.example.com"
CLIENT_NAME = "relay.client.test"


@attrs.frozen
class ServerCert:
    chain: Path  # private key + leaf + intermediates, PEM
    key: Path  # private key alone, PEM
    names: tuple[str, ...]


@attrs.frozen
class ClientCert:
    cert: Path  # leaf certificate chain, PEM (no key)
    key: Path  # private key, PEM
    combined: Path  # key and certificate chain in one file
    name: str


class TestPKI:
    """One trusted CA, one untrusted CA, four server certificates and a client certificate,
    all written under `directory` when constructed."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._owner: object = None  # what keeps `directory` alive, if anything
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="mailrelay test CA")
        self.other_ca = trustme.CA(organization_name="untrusted test CA")
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.other_ca_file = directory / "other-ca.pem"
        self.other_ca.cert_pem.write_to_path(str(self.other_ca_file))
        now = datetime.datetime.now(datetime.UTC)
        leaves = {
            "valid": (self.ca.issue_cert(*LOOPBACK_NAMES), LOOPBACK_NAMES),
            "untrusted": (self.other_ca.issue_cert(*LOOPBACK_NAMES), LOOPBACK_NAMES),
            "wrong_name": (self.ca.issue_cert(WRONG_NAME), (WRONG_NAME,)),
            "expired": (
                self.ca.issue_cert(
                    *LOOPBACK_NAMES,
                    not_before=now - datetime.timedelta(days=30),
                    not_after=now - datetime.timedelta(days=1),
                ),
                LOOPBACK_NAMES,
            ),
        }
        self._servers: dict[str, ServerCert] = {}
        for kind, (leaf, names) in leaves.items():
            chain, key = (
                directory / f"server-{kind}-chain.pem",
                directory / f"server-{kind}-key.pem",
            )
            leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
            leaf.private_key_pem.write_to_path(str(key))
            self._servers[kind] = ServerCert(chain, key, names)
        client = self.ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
        cert, key = directory / "client-cert.pem", directory / "client-key.pem"
        combined = directory / "client-combined.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
        client.private_key_pem.write_to_path(str(key))
        client.private_key_and_cert_chain_pem.write_to_path(str(combined))
        self.client = ClientCert(cert, key, combined, CLIENT_NAME)

    def server(self, kind: ServerKind = "valid") -> ServerCert:
        return self._servers[kind]


@functools.cache
def session_pki() -> TestPKI:
    """The PKI shared by every test in this process (made once: ECDSA keys are quick, but
    there is no reason to make them per test). Removed when the interpreter exits."""
    tmp = tempfile.TemporaryDirectory(prefix="mailrelay-pki-")
    pki = TestPKI(Path(tmp.name))
    # Keep the directory alive as long as the PKI; its finalizer removes it at exit.
    pki._owner = tmp
    return pki
