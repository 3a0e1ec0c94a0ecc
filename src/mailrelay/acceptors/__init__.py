"""Acceptor processes: more cores for accepting mail (``smtp.processes``).

The relay process listens on smtp.listen as always and starts ``processes - 1`` acceptor
processes that accept on the same TCP listening sockets (inherited file descriptors: the kernel
hands each new connection to whichever process calls accept() first, so a busy process takes
fewer; a unix: listener stays the relay process's, see worker.py). An acceptor runs only the
inbound side: SMTP sessions, and the durable write into the same spool's queue/ before its 250.
Then it tells the relay process, over a pipe, what it queued; the relay process alone
delivers, retries, bounces, and serves health, metrics, the control socket and alerts, as with
one process.

    channel.py      the frames on the pipe (queued message, log event, metrics snapshot)
    __main__.py     ``python -m mailrelay.acceptors``: ignores the relay's signals, runs worker
    worker.py       the acceptor process
    supervisor.py   the relay process's side: starts, reads, restarts and stops acceptors
    samples.py      acceptors' metrics, summed into the relay process's /metrics
"""
