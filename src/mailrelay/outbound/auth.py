"""SMTP AUTH client exchanges (RFC 4954): the command line and the answers to the server's
challenges, per mechanism. Pure functions: the client decides when (after TLS, once)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable

AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")

# Answers one 334 challenge (as sent: base64) with the bytes to send, before base64.
Responder = Callable[[bytes], bytes]


def auth_exchange(mechanism: str, username: str, password: str) -> tuple[bytes, list[Responder]]:
    """The AUTH command line for ``mechanism`` and its answers to the server's challenges, in
    order. PLAIN sends everything in the command (RFC 4616), LOGIN answers two challenges
    with the username and the password, CRAM-MD5 (RFC 2195) answers the one challenge with
    "user hex(HMAC-MD5(password, challenge))".

    Encodes both strings at once: UnicodeEncodeError here (never later, in a responder) for
    a password that is not UTF-8 (os.environ keeps undecodable bytes as surrogates); its
    text names an offset into the password, so callers report it in words of their own."""
    user = username.encode("utf-8")
    secret = password.encode("utf-8")
    if mechanism == "PLAIN":
        return b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + secret), []
    if mechanism == "LOGIN":
        # The challenges say "Username:" and "Password:"; servers differ in the wording and
        # never in the order, so their text is not checked.
        return b"AUTH LOGIN", [lambda _: user, lambda _: secret]
    if mechanism == "CRAM-MD5":

        def digest(challenge: bytes) -> bytes:
            # binascii.Error (a ValueError) on a malformed challenge: the caller gives up.
            nonce = base64.b64decode(challenge, validate=True)
            return user + b" " + hmac.new(secret, nonce, hashlib.md5).hexdigest().encode()

        return b"AUTH CRAM-MD5", [digest]
    raise ValueError(f"unsupported AUTH mechanism {mechanism}")
