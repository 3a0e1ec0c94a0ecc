"""Writing a reply or a command to a TCP socket at once.

Twisted's TCP transport never sends from write(): it buffers the data, asks epoll to report
the socket writable (epoll_ctl), sends on the next reactor turn, then asks epoll to stop
(epoll_ctl again). SMTP is one short line each way, turn after turn: at full load the profile
showed those epoll_ctl calls and the extra turns at ~8% of the reactor thread. ``write_now``
sends straight away when nothing is waiting in the transport's buffer and the socket takes it
all; otherwise (buffered data, a partial send, TLS, any other transport) it is the transport's
own write, so the order of the bytes and the transport's flow control stay as they were.

It reads four attributes of Twisted's TCP connection that are not public API (``dataBuffer``,
``_tempDataBuffer``, ``_writeDisconnected``, ``_aborting``); tests/integration/test_netwrite.py
checks them against the installed Twisted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    if (
        type(transport) in _PLAIN_TCP
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._aborting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN: the buffer path waits for room. A reset or broken pipe: the transport
            # meets the same error on its own send and closes the connection as usual.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
