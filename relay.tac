# For `twistd -ny relay.tac` (e.g. under supervisor). The config file comes from
# MAILRELAY_CONFIG; without it the relay runs on its embedded default.
import os

from mailrelay.service import makeApplication

application = makeApplication(os.environ.get("MAILRELAY_CONFIG"))
