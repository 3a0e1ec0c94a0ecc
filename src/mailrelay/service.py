"""Wiring: one MultiService with every part of the relay.

``makeService`` is the twistd plugin's entry point; ``makeApplication`` serves ``relay.tac``;
both are thin wrappers over ``buildService(reactor, config)``, which is where the parts meet.
Children start in the order added and stop in reverse: listeners stop first (no new mail;
the sessions end with a 421, in this process and the acceptor processes at the same time),
then the queue (closes provider connections, waits for running attempts to journal their
outcomes), and the I/O thread pool last.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from twisted.application import internet, service, strports
from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import ILogObserver
from twisted.python import components, usage

from mailrelay import __version__
from mailrelay.acceptors.samples import MergedRegistry, RemoteSamples
from mailrelay.acceptors.supervisor import AcceptorSupervisor
from mailrelay.alerts.mail import MailChannel
from mailrelay.alerts.rules import (
    AlertManager,
    BacklogRule,
    Channel,
    DiskRule,
    LogChannel,
    OldestAgeRule,
    ProviderDownRule,
    Rule,
)
from mailrelay.alerts.webhook import WebhookChannel
from mailrelay.blocking import IO_THREADS, BlockingRunner, IOThreads
from mailrelay.config import (
    AlertsConfig,
    Config,
    ConfigError,
    ProviderConfig,
    load,
    per_process_share,
)
from mailrelay.control import ControlFactory
from mailrelay.diskspace import FreeSpace
from mailrelay.inbound.factory import RelaySMTPFactory
from mailrelay.inbound.listeners import SMTPListeners
from mailrelay.logformat import LogSettings, twistd_log_observer
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.monitor import Monitor
from mailrelay.outbound.activity import Activity
from mailrelay.outbound.maildir import MaildirProvider
from mailrelay.outbound.pool import SMTPProvider
from mailrelay.outbound.results import IProvider
from mailrelay.outbound.router import Router
from mailrelay.pickup import MaildropPickup
from mailrelay.queue import DeliveryQueue, RetryPolicy
from mailrelay.spool.filesystems import acceptance_sync
from mailrelay.spool.store import FAILED, Spool, SpoolBusy, SpoolLock
from mailrelay.web import Operations, build_site

log = Logger(namespace="mailrelay")


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Send-only SMTP relay for local applications. Without --config it runs on the embedded"
        " default: SMTP on 127.0.0.1:2525 and [::1]:2525, health and metrics on"
        " 127.0.0.1:8025, spool in ./spool, every message captured into ./Maildir."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded default)."],
        [
            "log-format",
            None,
            None,
            "text or json: one JSON object per line (default: the config's [log]"
            " format, else text).",
        ],
    ]

    def postOptions(self) -> None:
        if self["log-format"] not in (None, "text", "json"):
            raise usage.UsageError("--log-format must be text or json")

    def opt_version(self) -> None:
        print(f"mailrelay {__version__}")
        raise SystemExit(0)


class _SequentialMultiService(service.MultiService):
    """Starts children in order and stops them in reverse order, one after another.

    MultiService.stopService calls every child's stopService at once and gathers the results,
    so the I/O thread pool would stop while the queue is still journalling the outcomes of
    in-flight attempts: those writes would never run (and stopService would never finish).

    ``log_observer``, when set, becomes the application's log observer: twistd uses an
    ILogObserver component of the application it runs instead of its own text observer.
    """

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and isinstance(parent, components.Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        children = list(self)
        children.reverse()

        async def stop_in_turn() -> None:
            for child in children:
                await _stop_child(child)

        return defer.Deferred.fromCoroutine(stop_in_turn())


async def _stop_child(child: service.IService) -> None:
    """Stop one child; a failure is logged, so the siblings still stop."""
    try:
        await defer.maybeDeferred(child.stopService)
    except Exception:
        log.failure("stopping {child} failed", child=child)


class _SideBySideMultiService(service.MultiService):
    """Stops its children at once (as MultiService does), logging a child's failure to stop
    instead of leaving it in a DeferredList nobody reads."""

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        stops = [defer.Deferred.fromCoroutine(_stop_child(c)) for c in reversed(list(self))]
        return defer.gatherResults(stops).addCallback(lambda _: None)


class _IOThreadsService(service.Service):
    def __init__(self, pool: IOThreads) -> None:
        self._pool = pool

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()


class _QueueService(service.Service):
    def __init__(self, queue: DeliveryQueue, pickup: MaildropPickup) -> None:
        self._queue = queue
        self._pickup = pickup
        self.delivering = False  # started, and not stopping: for /health

    def startService(self) -> None:
        super().startService()
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(lambda f: log.failure("the delivery queue failed to start", f))

    async def _start(self) -> None:
        # The maildrop first: a file adopted just before a crash is recognised by its copy
        # in queue/ before the queue can deliver (and remove) that copy.
        await self._pickup.pickup()
        await self._queue.start()
        self._pickup.start_polling()
        self.delivering = bool(self.running)

    def stopService(self) -> defer.Deferred[None]:
        self.delivering = False
        super().stopService()
        self._pickup.stop_polling()
        return defer.Deferred.fromCoroutine(self._queue.stop())


class _MonitorService(service.Service):
    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def startService(self) -> None:
        super().startService()
        self._monitor.start()

    def stopService(self) -> None:
        super().stopService()
        self._monitor.stop()


class _ReadinessService(service.Service):
    """Added after the listeners: running means mail is being accepted. At shutdown it stops
    first, so /health/ready says 503 before the listeners close, and waits ``drain_time``
    seconds so a load balancer's health check sees it and sends no new connection."""

    def __init__(self, clock: Any, drain_time: float) -> None:
        self._clock = clock
        self._drain_time = drain_time

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._drain_time <= 0:
            return None
        log.info("draining: /health/ready answers 503 for {seconds}s", seconds=self._drain_time)
        return task.deferLater(self._clock, self._drain_time)


class _SpoolLockService(service.Service):
    """Holds the spool's lock for the daemon's life; the first child, so released last."""

    def __init__(self, lock: SpoolLock) -> None:
        self._lock = lock

    def stopService(self) -> None:
        super().stopService()
        self._lock.release()


class _ControlSocketService(internet.StreamServerEndpointService):
    def __init__(self, reactor: Any, path: Path, factory: ControlFactory) -> None:
        # mode 0600: queue commands are for the daemon's user (see mailrelay.control).
        endpoint = UNIXServerEndpoint(reactor, str(path), mode=0o600, wantPID=False)
        super().__init__(endpoint, factory)
        self._path = path

    def privilegedStartService(self) -> None:
        # We hold the spool's lock: a socket file left here is a dead daemon's. (At stop,
        # the listening port removes its own socket file.)
        self._path.unlink(missing_ok=True)
        super().privilegedStartService()


# A queue command on a stopped spool holds the lock while it works (listing 100 000 messages
# takes a while): wait up to this long. Another daemon holds it for good: refuse at once.
LOCK_WAIT = 120.0


def _lock_spool(spool: Spool) -> SpoolLock:
    """The daemon's lock on its spool. A queue command on a stopped spool holds it for
    moments, so wait a little; another daemon holds it for good: refuse to start."""
    deadline = time.monotonic() + LOCK_WAIT
    waiting_said = False
    while True:
        try:
            return spool.lock("mailrelay daemon")
        except SpoolBusy as e:
            if e.holder_is_daemon or time.monotonic() >= deadline:
                raise ConfigError(f"spool.path: {e}") from None
            if not waiting_said:
                log.warn("waiting for the spool's lock: {why}", why=str(e))
                waiting_said = True
        time.sleep(0.1)  # before the reactor runs: nothing else is waiting on us


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _listen_endpoints(config: Config) -> tuple[str, ...]:
    listen = config.smtp.listen
    if config.is_embedded_default and not _ipv6_loopback_available():
        # The default listens on ::1 too; a host without IPv6 should still start on defaults.
        log.warn("no IPv6 loopback on this host: listening on 127.0.0.1 only")
        listen = tuple(d for d in listen if not d.startswith("tcp6:"))
    return listen


def _build_provider(
    config: ProviderConfig, reactor: Any, runner: BlockingRunner, metrics: Metrics
) -> IProvider:
    if config.kind == "maildir":
        return MaildirProvider(config, reactor, runner)
    return SMTPProvider(config, reactor, metrics)


def _alert_rules(config: AlertsConfig, min_free_space: int) -> list[Rule]:
    rules: list[Rule] = []
    if config.backlog > 0:
        rules.append(BacklogRule(config.backlog, config.clear_ratio))
    if config.oldest_age > 0:
        rules.append(OldestAgeRule(config.oldest_age, config.clear_ratio))
    disk_free = 2 * min_free_space if config.disk_free is None else config.disk_free
    if disk_free > 0:
        rules.append(DiskRule(disk_free, config.clear_ratio))
    if config.provider_down:
        rules.append(ProviderDownRule())
    return rules


def _alert_channels(config: Config, reactor: Any, router: Router, spool: Spool) -> list[Channel]:
    alerts = config.alerts
    channels: list[Channel] = [LogChannel()]
    if alerts.webhook_url is not None:
        channels.append(
            WebhookChannel(
                reactor,
                alerts.webhook_url,
                timeout=alerts.webhook_timeout,
                retries=alerts.webhook_retries,
            )
        )
    if alerts.mail_to is not None:
        channels.append(
            MailChannel(
                reactor,
                lambda: router.chain,
                mail_from=alerts.mail_from or f"mailrelay@{config.smtp.hostname}",
                mail_to=alerts.mail_to,
                hostname=config.smtp.hostname,
                new_id=spool.new_queue_id,
            )
        )
    return channels


def buildService(
    reactor: Any,
    config: Config,
    metrics: Metrics | None = None,
    log_settings: LogSettings | None = None,
) -> service.MultiService:
    """Every part of the relay, wired, as one service (nothing listens until it starts).

    ``log_settings``: the plugin's logging options; the service carries the log observer
    twistd is to use (see _log_observer)."""
    metrics = metrics if metrics is not None else Metrics()
    top = _SequentialMultiService()
    top.log_observer = twistd_log_observer(config.log.format, log_settings, reactor)

    runner = pool = IOThreads(reactor, IO_THREADS, name="mailrelay-io")
    # With acceptor processes, every queue ID says which process made it (0: this one), so the
    # rescan after an acceptor's exit takes that process's files alone (acceptors.supervisor).
    id_tag = 0 if config.smtp.processes > 1 else None
    try:
        # First, so that the file system holding it can be told (acceptance_sync).
        Path(config.spool.path).mkdir(parents=True, exist_ok=True)
        sync = acceptance_sync(config.spool.path, config.spool.directory_fsync)
        spool = Spool(
            Path(config.spool.path),
            runner,
            reactor.seconds,
            id_tag=id_tag,
            acceptance_directory_fsync=sync.directory_fsync,
        )
        lock = _lock_spool(spool)
        spool.prepare()
    except OSError as e:
        raise ConfigError(
            f"spool.path: cannot use {config.spool.path!r}: {e.strerror or e}"
        ) from None
    log.info(
        "spool {path}: each acceptance fsyncs {what} ({reason})",
        path=config.spool.path,
        what="the file and queue/" if sync.directory_fsync else "the file only",
        reason=sync.reason,
    )

    providers = {p.name: _build_provider(p, reactor, runner, metrics) for p in config.providers}
    activity = Activity(reactor)
    router = Router(
        [providers[name] for name in config.routing.default],
        {
            domain: [providers[name] for name in chain]
            for domain, chain in config.routing.sender_domains.items()
        },
        activity=activity,
    )
    policy = RetryPolicy(
        initial=config.spool.retry_initial,
        maximum=config.spool.retry_max,
        lifetime=config.spool.max_lifetime,
    )
    queue = DeliveryQueue(
        reactor,
        spool,
        router,
        policy,
        metrics,
        reporting_mta=config.smtp.hostname if config.spool.bounce == "dsn" else None,
    )
    pickup = MaildropPickup(reactor, spool, config.smtp, queue.enqueue, metrics)
    queue_service = _QueueService(queue, pickup)
    control = ControlFactory(queue, {"pickup": pickup.pickup})

    # One statvfs reader for the MAIL check and the monitor; with the check off, the monitor
    # still reads free space (for /health and the disk_low alert) through one with no floor.
    disk = FreeSpace(config.spool.path, config.spool.min_free_space, reactor)
    free_space = disk if config.spool.min_free_space > 0 else None
    # With acceptor processes, this process enforces its share of the inbound limits too.
    smtp_share, limits_share = per_process_share(config.smtp, config.limits)
    factory = RelaySMTPFactory(
        smtp_share,
        reactor,
        spool,
        queue.enqueue,
        metrics,
        free_space=free_space,
        limits=limits_share,
    )
    readiness = _ReadinessService(reactor, config.http.drain_time)

    monitor = Monitor(
        reactor,
        queue,
        router,
        activity,
        provider_kinds={p.name: p.kind for p in config.providers},
        free_bytes=disk.available,
        count_failed=lambda: runner.run(spool.count, FAILED),
        accepting=lambda: bool(readiness.running),
        delivering=lambda: queue_service.delivering,
        interval=config.alerts.check_interval,
    )
    metrics.watch(monitor)
    metrics.start_time.set(monitor.started_at)
    for provider in router.providers:
        metrics.watch_provider(provider.name, activity.last_success_time(provider.name))
    alerts = AlertManager(
        reactor,
        _alert_rules(config.alerts, config.spool.min_free_space),
        _alert_channels(config, reactor, router, spool),
        metrics,
        host=config.smtp.hostname,
        repeat_interval=config.alerts.repeat_interval,
        clear_after=config.alerts.clear_after,
    )
    monitor.subscribe(alerts.evaluate)
    ops = Operations(
        monitor=monitor,
        alerts=alerts,
        min_free_space=config.spool.min_free_space,
        hostname=config.smtp.hostname,
    )
    site = build_site(ops, metrics)

    # Started in this order, stopped in reverse. The lock first, so it is released last:
    # after the I/O pool has finished its writes. HTTP before the queue, so /health answers
    # while the queue drains at stop. Readiness last: at stop it turns /health/ready to 503
    # first, and waits http.drain_time before the SMTP listeners close.
    _SpoolLockService(lock).setServiceParent(top)
    _IOThreadsService(pool).setServiceParent(top)
    strports.service(config.http.listen, site).setServiceParent(top)
    queue_service.setServiceParent(top)
    _ControlSocketService(reactor, spool.control_socket, control).setServiceParent(top)
    _MonitorService(monitor).setServiceParent(top)
    # The listeners and the acceptor processes stop side by side: every process's sessions
    # hear their 421 at the same time, instead of this process's waiting for the acceptors'
    # grace to run out.
    inbound = _SideBySideMultiService()
    inbound.setServiceParent(top)
    listeners = SMTPListeners(reactor, _listen_endpoints(config), factory)
    listeners.setServiceParent(inbound)
    if config.smtp.processes > 1:
        remote = RemoteSamples()
        metrics.expose(MergedRegistry(metrics.registry, remote))
        AcceptorSupervisor(
            reactor,
            listeners.ports,
            config.smtp,
            config.limits,
            config.spool,
            queue.enqueue,
            queue.enqueue_id,
            lambda tag: defer.Deferred.fromCoroutine(_after_acceptor_exit(spool, queue, tag)),
            metrics,
            remote,
            acceptance_directory_fsync=spool.acceptance_directory_fsync,
        ).setServiceParent(inbound)
    readiness.setServiceParent(top)

    if all(p.kind == "maildir" for p in config.providers):
        log.warn(
            "no upstream SMTP provider is configured: every message is stored in the Maildir"
            " {paths} instead of being relayed (capture mode)",
            paths=", ".join(str(Path(p.path).resolve()) for p in config.providers),
        )
    log.info(
        "mailrelay {version} config={source} spool={spool} chain={chain}",
        version=__version__,
        source=config.source or "<embedded default>",
        spool=str(Path(config.spool.path).resolve()),
        chain=",".join(config.routing.default),
    )
    return top


async def _after_acceptor_exit(spool: Spool, queue: DeliveryQueue, tag: int) -> int:
    """An acceptor process whose queue IDs carry ``tag`` has exited: the messages it made
    durable but could not report are indexed (returns how many), then its partial messages
    in tmp/ go (sessions its death cut; otherwise they would wait for the next start)."""
    adopted = await queue.adopt_unindexed(tag)
    try:
        removed = await spool.run(spool.clear_tmp, tag)
    except OSError as e:
        # Not worth a retry: they only take space, and the next start clears tmp/.
        log.warn("could not clear an exited acceptor's files from tmp/: {error}", error=str(e))
    else:
        if removed:
            log.info(
                "removed {count} partial message(s) of an exited acceptor from tmp/",
                count=removed,
            )
    return adopted


def _load_or_exit(path: str | None) -> Config:
    try:
        return load(path)
    except ConfigError as e:
        # One line, no traceback, non-zero exit: twistd prints the SystemExit message.
        raise SystemExit(f"mailrelay: config error: {e}") from None


def _build_or_exit(config: Config, log_settings: LogSettings | None = None) -> service.MultiService:
    from twisted.internet import reactor

    try:
        return buildService(reactor, config, log_settings=log_settings)
    except ConfigError as e:
        raise SystemExit(f"mailrelay: config error: {e}") from None


def makeService(options: Options) -> service.MultiService:
    """Entry point of ``twistd mailrelay``."""
    # twistd's own options, parsed before ours (none for a bare call in a test).
    parent = getattr(options, "parent", None) or {}
    settings = LogSettings(
        format=options["log-format"],
        file=parent.get("logfile") or None,
        daemon=not parent.get("nodaemon", True),
        syslog=bool(parent.get("syslog")),
    )
    return _build_or_exit(_load_or_exit(options["config"]), settings)


def makeApplication(config_path: str | None) -> Any:
    """Entry point of ``relay.tac``: ``application = makeApplication(os.environ.get(...))``.

    Returns twistd's Application object (a componentized service; untyped upstream).
    """
    application = service.Application("mailrelay")
    _build_or_exit(_load_or_exit(config_path)).setServiceParent(application)
    return application
