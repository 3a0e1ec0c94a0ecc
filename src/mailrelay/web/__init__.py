"""The HTTP side on 127.0.0.1:8025: health, metrics and the status page (see site.py)."""

from mailrelay.web.site import Operations, build_site

__all__ = ["Operations", "build_site"]
