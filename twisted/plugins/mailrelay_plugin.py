# Only points at mailrelay.service: importing twisted.mail or prometheus_client here would
# install the global reactor for every twistd app in this environment (pitfall 28).
from twisted.application.service import ServiceMaker

mailrelay = ServiceMaker(
    "mailrelay",
    "mailrelay.service",
    "Send-only loopback SMTP relay with a durable spool and upstream failover.",
    "mailrelay",
)
