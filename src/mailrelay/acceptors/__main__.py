"""``python -m mailrelay.acceptors SETTINGS``: an acceptor process (see worker.py).

An acceptor leaves SIGTERM, SIGINT, SIGHUP and SIGUSR1 to the relay process (worker.py says
why). They are ignored here, before the imports of Twisted and the relay take their few hundred
milliseconds: a signal to the whole process group in that window would otherwise kill an
acceptor that was just started.
"""

import signal
import sys

for _signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(_signum, signal.SIG_IGN)

from mailrelay.acceptors.worker import main  # noqa: E402

sys.exit(main())
