"""write_now on real loopback TCP connections and real pipes (the real reactor, under
twisted.trial)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from twisted.internet import defer, protocol, reactor, stdio, tcp
from twisted.trial import unittest

from mailrelay.inbound.factory import ProxyHeaderFactory, ProxyHeaderReader
from mailrelay.netwrite import write_now
from tests.support.polling import poll
from tests.unit.helpers_inbound import HOSTNAME, make_factory


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class WriteNowTests(unittest.TestCase):
    async def _connected(self) -> tuple[tcp.Server, socket.socket]:
        """A server-side Twisted transport and the raw client socket at its other end."""
        accepted: defer.Deferred[_Collect] = defer.Deferred()

        class Factory(protocol.ServerFactory):
            def buildProtocol(self, addr: object) -> _Collect:
                proto = _Collect()
                reactor.callLater(0, accepted.callback, proto)
                return proto

        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        proto = await accepted
        transport = proto.transport
        self.addCleanup(transport.abortConnection)
        assert isinstance(transport, tcp.Server)
        client.setblocking(False)
        return transport, client

    async def test_sends_at_once_without_a_reactor_turn(self) -> None:
        transport, client = await self._connected()
        write_now(transport, b"250 ok\r\n")
        # No reactor turn between the call and this read: the bytes are on the wire already.
        assert client.recv(100) == b"250 ok\r\n"
        assert not transport.dataBuffer and not transport._tempDataBuffer

    async def test_queued_data_keeps_its_place_before_later_writes(self) -> None:
        transport, client = await self._connected()
        transport.write(b"first\r\n")  # buffered by Twisted, not sent before a reactor turn
        write_now(transport, b"second\r\n")
        assert transport._tempDataBuffer  # it went behind the first, not around it
        received = b""

        def got_both() -> bool:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                received += client.recv(100)
            return received == b"first\r\nsecond\r\n"

        await poll(got_both, 5, "both lines in order")

    async def test_a_full_socket_leaves_the_rest_to_the_transport(self) -> None:
        transport, client = await self._connected()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 800  # 200 KiB: far more than both buffers hold
        write_now(transport, data)
        assert transport._tempDataBuffer or transport.dataBuffer  # the rest, buffered
        received = bytearray()

        def got_all() -> bool:
            try:
                while True:
                    chunk = client.recv(1 << 16)
                    if not chunk:
                        break
                    received.extend(chunk)
            except BlockingIOError:
                pass
            return len(received) >= len(data)

        await poll(got_all, 10, "the whole payload")
        assert bytes(received) == data

    async def test_a_closing_transport_is_left_to_its_own_write(self) -> None:
        transport, client = await self._connected()
        transport.write(b"last\r\n")
        transport.loseConnection()
        write_now(transport, b"late\r\n")  # Twisted's own write still sends it, in order
        received = b""

        def closed() -> bool:
            nonlocal received
            try:
                chunk = client.recv(100)
            except BlockingIOError:
                return False
            received += chunk
            return chunk == b""

        await poll(closed, 5, "the close")
        assert received == b"last\r\nlate\r\n"

    def test_other_transports_use_their_own_write(self) -> None:
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        write_now(transport, b"x\r\n")
        assert transport.value() == b"x\r\n"

    async def test_the_twisted_internals_it_reads_exist(self) -> None:
        # If Twisted renames these, write_now must be revisited (see its module docstring).
        transport, _ = await self._connected()
        for name in ("dataBuffer", "_tempDataBuffer", "_writeDisconnected", "_aborting", "TLS"):
            assert hasattr(transport, name), name


class WriteNowPipeTests(unittest.TestCase):
    """An acceptor's report pipe: twisted.internet.stdio.StandardIO on real pipes."""

    def _standard_io(self) -> tuple[stdio.StandardIO, int]:
        """A StandardIO writing to a pipe, and the pipe's reading end (non-blocking)."""
        read_end, write_end = os.pipe()
        stdin_read, stdin_write = os.pipe()
        os.set_blocking(read_end, False)
        transport = stdio.StandardIO(
            _Collect(),
            stdin=stdin_read,
            stdout=write_end,
            reactor=reactor,  # type: ignore[call-arg]  # the POSIX one
        )

        def close() -> None:
            transport.loseConnection()
            for fd in (read_end, stdin_write):
                os.close(fd)

        self.addCleanup(close)
        return transport, read_end

    def test_writes_at_once_without_a_reactor_turn(self) -> None:
        transport, read_end = self._standard_io()
        write_now(transport, b"Q frame")
        assert os.read(read_end, 100) == b"Q frame"
        writer = transport._writer
        assert not writer.dataBuffer and not writer._tempDataBuffer

    async def test_buffered_data_keeps_its_place(self) -> None:
        transport, read_end = self._standard_io()
        transport.write(b"first ")  # buffered by Twisted until a reactor turn
        write_now(transport, b"second")
        received = b""

        def got_both() -> bool:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                received += os.read(read_end, 100)
            return received == b"first second"

        await poll(got_both, 5, "both frames in order")

    def test_the_twisted_internals_it_reads_exist(self) -> None:
        transport, _ = self._standard_io()
        for name in ("dataBuffer", "_tempDataBuffer", "connected", "disconnecting", "fd"):
            assert hasattr(transport._writer, name), name


class ProxiedSessionTests(unittest.TestCase):
    """A session behind a haproxy: listener: the SMTP side writes to the header reader, not to
    the TCP transport; its replies still go out at once, with Nagle off."""

    async def test_replies_through_the_header_reader_go_out_at_once_without_nagle(self) -> None:
        root = Path(self.mktemp())
        root.mkdir(parents=True)
        smtp_factory = make_factory(root)
        factory = ProxyHeaderFactory(smtp_factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n")
        client.setblocking(False)
        received = b""

        def banner() -> bool:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                received += client.recv(100)
            return received.endswith(b"\r\n")

        await poll(banner, 5, "the banner")
        assert received == f"220 {HOSTNAME} ESMTP mailrelay\r\n".encode()
        [session] = smtp_factory.active
        reader = session.transport
        assert isinstance(reader, ProxyHeaderReader)
        self.addCleanup(reader.abortConnection)
        tcp_socket = reader.transport.socket
        assert tcp_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        reader.write(b"250 at once\r\n")
        assert client.recv(100) == b"250 at once\r\n"  # no reactor turn in between
