"""cProfile for the acceptor processes of a relay run (the relay process has twistd's own
``--profile``). Bench tooling, never imported by the relay itself.

With this directory first on PYTHONPATH and PYTHONPROFILEDIR naming a directory, every
acceptor process (``python -m mailrelay.acceptors``) profiles its main thread, the reactor
thread, and writes ``acceptor.PID.prof`` there when it exits. Both variables start with
``PYTHON``, which is what the relay process passes on to its acceptors (see
acceptor_environment). The relay process is left alone: twistd ends a run stopped by a
signal by sending itself that signal again, so no exit handler of ours would run there, while
twistd's ``--profile`` writes its file before. bench/README.md ("Profiling both processes")
shows a run.
"""

import os
import sys

_directory = os.environ.get("PYTHONPROFILEDIR")
if _directory and "mailrelay.acceptors" in sys.orig_argv:
    import atexit
    import cProfile

    _profile = cProfile.Profile()

    def _dump() -> None:
        _profile.disable()
        _profile.dump_stats(os.path.join(_directory, f"acceptor.{os.getpid()}.prof"))

    atexit.register(_dump)
    _profile.enable()
