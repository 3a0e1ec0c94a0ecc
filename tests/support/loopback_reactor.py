"""A real reactor whose name resolver sends every host name to 127.0.0.1.

Lets a client talk to a local upstream under a remote name (say "smtp.example.test"), so
that certificate checks and the client's "AUTH in clear to loopback is fine" exemption see
that name, not "127.0.0.1".

    provider = SMTPProvider(config, LoopbackReactor(reactor), metrics)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
)
from zope.interface import implementer


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class LoopbackResolver:
    """Every name resolves to 127.0.0.1: talk to the local upstream under a remote name."""

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        resolutionReceiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IReactorTCP, IReactorTime, IReactorPluggableNameResolver)
class LoopbackReactor:
    """The real reactor with a name resolver that sends every host name to loopback."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.nameResolver = LoopbackResolver()

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError("fixed for the test")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
