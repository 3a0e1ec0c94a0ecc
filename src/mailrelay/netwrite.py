"""Writing a reply or a command to a TCP socket (or a frame to a pipe) at once.

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

The same holds for an acceptor's report pipe (``twisted.internet.stdio.StandardIO``), one frame
a message: its writer also watches the pipe for reading while idle, so each buffered write
cost four epoll_ctl calls. There ``write_now`` writes to the pipe's descriptor when the writer
holds nothing (``dataBuffer``, ``_tempDataBuffer`` of its ``_writer``, not public either).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import stdio, tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    sent = 0
    kind = type(transport)
    if kind in _PLAIN_TCP:
        if (
            not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._aborting
            and not transport.dataBuffer
            and not transport._tempDataBuffer
        ):
            sent = _send_some(transport.socket.send, data)
    elif kind is stdio.StandardIO:
        writer = transport._writer
        if (
            writer is not None
            and writer.connected
            and not writer.disconnecting
            and not writer.disconnected
            and not writer.dataBuffer
            and not writer._tempDataBuffer
        ):
            sent = _send_some(lambda chunk: os.write(writer.fd, chunk), data)
    if sent == len(data):
        return
    transport.write(data[sent:] if sent else data)


def _send_some(send: Any, data: bytes) -> int:
    try:
        return int(send(data))
    except OSError:
        # EAGAIN: the buffer path waits for room. A reset or a broken pipe: the transport
        # meets the same error on its own write and closes the connection as usual.
        return 0
