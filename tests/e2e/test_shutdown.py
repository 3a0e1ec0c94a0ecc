"""A relay told to stop (SIGTERM to the real twistd) ends its SMTP sessions as RFC 5321 3.8
asks: an idle client hears 421, a client in the middle of a message finishes it, hears 250
for it and then 421; the message is kept. The same for a session an acceptor process holds."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.e2e.test_acceptors import acceptors_of
from tests.support.net import free_port, wait_until
from tests.support.rawsmtp import RawSMTP
from tests.support.relay import RelayProcess, relay_config
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.e2e


def _session_in_data(port: int) -> RawSMTP:
    client = RawSMTP(port)
    assert client.code().startswith("220")
    client.send(b"EHLO client.test\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<r@example.com>\r\n")
    client.send(b"DATA\r\n")
    assert client.reply()[-1].startswith("250")  # EHLO
    assert client.codes(3) == ["250 2.1.0", "250 2.1.5", "354"]
    client.send(b"Subject: sent across the stop\r\n\r\nfirst half\r\n")
    return client


def _idle_session(port: int) -> RawSMTP:
    client = RawSMTP(port)
    assert client.code().startswith("220")
    client.send(b"EHLO client.test\r\n")
    assert client.reply()[-1].startswith("250")
    return client


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_says_421_to_sessions_and_lets_a_message_in_progress_finish(
    tmp_path: Path, processes: int
) -> None:
    with UpstreamProcess(tmp_path / "upstream") as upstream:
        smtp_port, http_port = free_port(), free_port()
        spool = tmp_path / "spool"
        text = relay_config(spool, smtp_port, http_port, upstream.port, {"processes": processes})
        relay = RelayProcess(tmp_path, text, smtp_port, http_port)
        with relay:
            assert relay._proc is not None
            idle = [_idle_session(smtp_port) for _ in range(2)]
            in_data = [_session_in_data(smtp_port) for _ in range(2)]
            if processes > 1:
                # Sessions the acceptor holds: with the relay process frozen, only the
                # acceptor can take a connection and answer.
                wait_until(lambda: acceptors_of(spool), 10, what="the acceptor started")
                relay._proc.send_signal(signal.SIGSTOP)
                try:
                    idle.append(_idle_session(smtp_port))
                    in_data.append(_session_in_data(smtp_port))
                finally:
                    relay._proc.send_signal(signal.SIGCONT)

            relay._proc.send_signal(signal.SIGTERM)
            for client in idle:
                assert client.last(timeout=10).startswith("421 4.3.2 "), "idle: no 421"
                assert client.closed(timeout=10)
            for client in in_data:
                client.send(b"second half\r\n.\r\n")
            queue_ids = []
            for client in in_data:
                reply = client.last(timeout=10)
                assert reply.startswith("250 2.0.0 Ok: queued as "), reply
                queue_ids.append(reply.rsplit(" ", 1)[1])
                assert client.last(timeout=10).startswith("421 4.3.2 ")
                assert client.closed(timeout=10)
            assert relay._proc.wait(timeout=30) in (0, -signal.SIGTERM), relay.log_tail()

        # Each message the relay said 250 to is kept: delivered (its queue ID is in the
        # Received header) or in the queue for the next start.
        queued = {p.name for p in (spool / "queue").iterdir()}
        delivered = b"".join(m["body"] for m in upstream.messages())
        for queue_id in queue_ids:
            assert queue_id in queued or f"id {queue_id}".encode() in delivered, queue_id
