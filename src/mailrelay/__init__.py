"""mailrelay: a send-only, loopback-only SMTP relay on Twisted."""

__version__ = "0.1.0"
