"""Configuration: a TOML file becomes frozen attrs values.

Every key is optional; missing keys take the embedded defaults below. Every error is a
`ConfigError` whose message names the key it is about (``providers[1].port: ...``), so the
command line can print it on one line and exit non-zero.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import attrs

from mailrelay.netaddr import is_loopback_host, parse_network

T = TypeVar("T")

TLSMode = Literal["starttls", "implicit", "none"]
ProviderKind = Literal["smtp", "maildir"]


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator: ``key: what is wrong``."""


# smtp.processes at most: more processes than cores only add context switches.
MAX_PROCESSES = 64


def _default_hostname() -> str:
    name = socket.gethostname()
    if name and all(c.isascii() and (c.isalnum() or c in "-.") for c in name):
        return name
    return "localhost"


@attrs.frozen
class SMTPConfig:
    listen: tuple[str, ...] = (
        "tcp:2525:interface=127.0.0.1",
        r"tcp6:2525:interface=\:\:1",
    )
    # The name in the banner and in Received headers; our own, not socket.getfqdn() (pitfall 13).
    hostname: str = attrs.field(factory=lambda: _default_hostname())
    max_message_size: int = 26_214_400
    max_recipients: int = 1000
    max_connections: int = 100
    idle_timeout: float = 300.0
    session_timeout: float = 3600.0
    max_errors: int = 20
    # Seconds to wait before the banner; a client that talks first is refused (554 5.5.1),
    # as Postfix's postscreen does. 0 (default): the banner goes out at once, since every
    # connection would pay the pause.
    greet_pause: float = 0.0
    # Networks (CIDR) whose clients may connect besides loopback and UNIX sockets, e.g. the app
    # servers. Empty: loopback only, and smtp.listen must stay on loopback; set, a non-loopback
    # listen address is allowed and only these peers get in. On a haproxy: listener both the
    # proxy (the socket's peer) and the client named in its PROXY header must pass.
    allow_networks: tuple[str, ...] = ()
    # Processes that accept mail on the smtp.listen sockets: this one, plus processes - 1
    # acceptor processes that share its listening sockets and spool and hand every message
    # they accept to it for delivery (see mailrelay.acceptors). More than 1 uses more cores.
    processes: int = 1


@attrs.frozen
class LimitsConfig:
    """Inbound limits beyond smtp's. Rates are per second (0: off); bursts are how many may go
    at once after a quiet spell. Keys are the client address (IPv4-mapped unwrapped, every
    UNIX-socket client one key) and the envelope sender (lower-cased, ``<>`` its own key)."""

    # Connections open at once from one client address (0: only smtp.max_connections applies).
    connections_per_peer: int = 50
    # New connections per second from one client address (421 4.7.0 at connect).
    connection_rate: float = 0.0
    connection_burst: int = 20
    # MAIL commands per second from one client address / for one envelope sender (451 4.7.1).
    messages_per_client: float = 0.0
    client_burst: int = 50
    messages_per_sender: float = 0.0
    sender_burst: int = 50
    # Keys each rate limiter tracks at most; past that the key used longest ago is forgotten.
    max_tracked_keys: int = 100_000


def per_process_share(smtp: SMTPConfig, limits: LimitsConfig) -> tuple[SMTPConfig, LimitsConfig]:
    """The inbound limits one of smtp.processes processes enforces: its share of each, so the
    processes together allow what the config says (counts rounded up, never below 1).

    Each process counts only the connections it accepted, so a client whose connections land
    unevenly may meet a process's share a little before the whole limit."""
    n = smtp.processes
    if n == 1:
        return smtp, limits

    def share(count: int) -> int:
        return -(-count // n) if count > 0 else count  # 0 (off) stays off

    return (
        attrs.evolve(smtp, max_connections=share(smtp.max_connections)),
        attrs.evolve(
            limits,
            connections_per_peer=share(limits.connections_per_peer),
            connection_rate=limits.connection_rate / n,
            connection_burst=share(limits.connection_burst),
            messages_per_client=limits.messages_per_client / n,
            client_burst=share(limits.client_burst),
            messages_per_sender=limits.messages_per_sender / n,
            sender_burst=share(limits.sender_burst),
        ),
    )


@attrs.frozen
class HTTPConfig:
    listen: str = "tcp:8025:interface=127.0.0.1"
    # At stop, /health/ready answers 503 for this many seconds before the SMTP listeners
    # close, so a load balancer's health check notices and stops sending (0: close at once).
    drain_time: float = 0.0


@attrs.frozen
class AlertsConfig:
    # Seconds between two readings of the queue, providers and disk (alerts, status chart).
    check_interval: float = 10.0
    # Fire when more than this many messages wait for delivery (the seed's 100); 0: off.
    backlog: int = 100
    # Fire when the oldest queued message is older than this many seconds; 0: off.
    oldest_age: float = 3600.0
    # Fire when free space on the spool's filesystem is below this many bytes; 0: off.
    # None: twice spool.min_free_space, so the alert comes before mail is refused.
    disk_free: int | None = None
    # Fire when a provider's circuit breaker opens (resolves when it closes).
    provider_down: bool = True
    # Hysteresis: a firing alert resolves only once its value is back below threshold times
    # this ratio (above it, for disk_free), so a value that hovers at the line fires once.
    clear_ratio: float = 0.8
    # ... and only after its readings have been good this many seconds in a row, so a
    # flapping provider is one alert, not one every minute; 0: at the first good reading.
    clear_after: float = 60.0
    # While an alert stays active, notify again every this many seconds; 0: never again.
    repeat_interval: float = 3600.0
    # Channels besides the log. A webhook gets each notification as a JSON POST.
    webhook_url: str | None = attrs.field(default=None, repr=False)  # its path may be a token
    # http:// only to a loopback host, unless this is set: the URL's token would cross the
    # network in clear.
    webhook_insecure: bool = False
    webhook_timeout: float = 10.0
    webhook_retries: int = 3
    # Mail to an admin, sent straight through the first provider that takes mail, never
    # through the queue the alert may be about.
    mail_to: str | None = None
    mail_from: str | None = None  # default: mailrelay@<smtp.hostname>


@attrs.frozen
class LogConfig:
    format: Literal["text", "json"] = "text"


@attrs.frozen
class SpoolConfig:
    path: str = "spool"
    retry_initial: float = 300.0
    retry_max: float = 3600.0
    max_lifetime: float = 5 * 24 * 3600.0
    # Below this many free bytes on the spool's filesystem, MAIL is refused (452 4.3.1) so the
    # disk never fills in the middle of a message; 0 turns the check off.
    min_free_space: int = 100 * 1024 * 1024
    # "dsn": a permanently failed recipient is reported to the sender (RFC 3464) and the
    # message removed; "deadletter": the message is kept in failed/ and nobody is told.
    bounce: Literal["dsn", "deadletter"] = "dsn"
    # "auto": on ext4 and XFS an accepted message is renamed into queue/ and then
    # fsynced once, which makes it and its name durable (mailrelay.spool.filesystems);
    # elsewhere queue/ is fsynced as well. "always": fsync queue/ after every acceptance.
    directory_fsync: Literal["auto", "always"] = "auto"


@attrs.frozen
class ProviderConfig:
    name: str
    kind: ProviderKind = "smtp"
    # smtp
    host: str = "127.0.0.1"
    port: int = 25
    tls: TLSMode = "starttls"
    ca_file: str | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    helo: str = "localhost"
    connections: int = 4
    max_messages_per_connection: int = 1000
    idle_timeout: float = 60.0
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    final_timeout: float = 600.0
    # Reuse: a NOOP every ``keepalive`` seconds while idle (0: none) finds dead connections
    # before a message does; QUIT after ``idle_timeout`` idle or ``max_connection_age`` in all.
    keepalive: float = 30.0
    max_connection_age: float = 600.0
    # TLS: the name verified in the certificate and sent as SNI (default: host); a client
    # certificate (PEM; the key may be in the same file); ``insecure`` allows tls = "none" to
    # a host that is not loopback (never AUTH in clear).
    tls_name: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    insecure: bool = False
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")
    # Failover policy for the provider's own answers (design.md, errors by class): a 4xx to
    # MAIL/RCPT/DATA goes to the next provider ("next") or stays here for a later retry
    # ("defer"); a 5xx to a recipient is final ("fail") or tried at the next provider ("next").
    on_temporary: Literal["next", "defer"] = "next"
    on_permanent: Literal["fail", "next"] = "fail"
    # Shaping: recipients per transaction (0: all), seconds between a message's batches,
    # transactions and recipients per second (0: unlimited), transactions per UTC day (0: none).
    batch_size: int = 20
    batch_delay: float = 1.0
    rate: float = 0.0
    recipient_rate: float = 0.0
    daily_quota: int = 0
    # Circuit breaker: open after this many failures in a row, for breaker_cooldown seconds,
    # doubling on each failed probe up to breaker_max_cooldown.
    breaker_threshold: int = 3
    breaker_cooldown: float = 30.0
    breaker_max_cooldown: float = 600.0
    # maildir
    path: str = "Maildir"

    def password(self) -> str | None:
        """Read the secret at the moment it is needed; it is never stored in the config value."""
        if self.password_env is not None:
            return os.environ.get(self.password_env)
        if self.password_file is not None:
            return Path(self.password_file).read_text().strip()
        return None


@attrs.frozen
class RoutingConfig:
    default: tuple[str, ...] = ("local",)
    # Sender domain (lower case, exact match) -> its own chain; other senders use default.
    sender_domains: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)

    def chains(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every chain with the key it was configured under, for checks."""
        return [("default", self.default)] + [
            (f"sender_domains.{d}", c) for d, c in self.sender_domains.items()
        ]


DEFAULT_PROVIDERS = (ProviderConfig(name="local", kind="maildir", path="Maildir"),)


@attrs.frozen
class Config:
    smtp: SMTPConfig = SMTPConfig()
    http: HTTPConfig = HTTPConfig()
    spool: SpoolConfig = SpoolConfig()
    limits: LimitsConfig = LimitsConfig()
    providers: tuple[ProviderConfig, ...] = DEFAULT_PROVIDERS
    routing: RoutingConfig = RoutingConfig()
    alerts: AlertsConfig = AlertsConfig()
    log: LogConfig = LogConfig()
    source: str | None = None  # the file it came from; None means the embedded default

    @property
    def is_embedded_default(self) -> bool:
        return self.source is None

    def provider(self, name: str) -> ProviderConfig:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)


# -- reading ---------------------------------------------------------------------------------


def load(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a config file; None gives the embedded default."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, source=str(path))


def parse(data: Mapping[str, Any], source: str | None = "<string>") -> Config:
    _no_unknown_keys(
        data, {"smtp", "http", "spool", "limits", "providers", "routing", "alerts", "log"}, ""
    )
    smtp = _section(data, "smtp", _parse_smtp)
    http = _section(data, "http", _parse_http)
    spool = _section(data, "spool", _parse_spool)
    limits = _section(data, "limits", _parse_limits)
    alerts = _section(data, "alerts", _parse_alerts)
    log = _section(data, "log", _parse_log)

    if "providers" in data:
        raw_providers = data["providers"]
        if not isinstance(raw_providers, list) or not raw_providers:
            raise ConfigError("providers: must be a non-empty array of tables ([[providers]])")
        providers = tuple(
            _parse_provider(_table(p, f"providers[{i}]"), f"providers[{i}]")
            for i, p in enumerate(raw_providers)
        )
    else:
        providers = DEFAULT_PROVIDERS
    names = [p.name for p in providers]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"providers[{i}].name: duplicate provider name {name!r}")

    if "routing" in data:
        routing = _parse_routing(_table(data["routing"], "routing"), "routing")
    elif "providers" in data:
        # With providers but no routing, the chain is the providers in the order written.
        routing = RoutingConfig(default=tuple(names))
    else:
        routing = RoutingConfig()
    for key, chain in routing.chains():
        for i, name in enumerate(chain):
            if name not in names:
                raise ConfigError(f"routing.{key}[{i}]: no provider named {name!r}")

    return Config(
        smtp=smtp,
        http=http,
        spool=spool,
        limits=limits,
        providers=providers,
        routing=routing,
        alerts=alerts,
        log=log,
        source=source,
    )


def _section(
    data: Mapping[str, Any], name: str, parser: Callable[[Mapping[str, Any], str], T]
) -> T:
    return parser(_table(data.get(name, {}), name), name)


def _parse_smtp(t: Mapping[str, Any], key: str) -> SMTPConfig:
    d = SMTPConfig()
    _no_unknown_keys(t, attrs.fields_dict(SMTPConfig).keys(), key)
    allow_networks = _networks(t, "allow_networks", key)
    listen = _endpoint_list(t, "listen", key, d.listen)
    for i, desc in enumerate(listen):
        _check_server_endpoint(
            desc,
            f"{key}.listen[{i}]",
            loopback_only=not allow_networks,
            hint=f" (set {key}.allow_networks to accept clients from other networks)",
        )
    return SMTPConfig(
        listen=listen,
        allow_networks=allow_networks,
        hostname=_hostname(t, "hostname", key, d.hostname),
        max_message_size=_int(t, "max_message_size", key, d.max_message_size, minimum=1024),
        max_recipients=_int(t, "max_recipients", key, d.max_recipients, minimum=1),
        max_connections=_int(t, "max_connections", key, d.max_connections, minimum=1),
        idle_timeout=_seconds(t, "idle_timeout", key, d.idle_timeout),
        session_timeout=_seconds(t, "session_timeout", key, d.session_timeout),
        max_errors=_int(t, "max_errors", key, d.max_errors, minimum=1),
        greet_pause=_seconds(t, "greet_pause", key, d.greet_pause, zero_ok=True),
        processes=_int(t, "processes", key, d.processes, minimum=1, maximum=MAX_PROCESSES),
    )


def _parse_limits(t: Mapping[str, Any], key: str) -> LimitsConfig:
    d = LimitsConfig()
    _no_unknown_keys(t, attrs.fields_dict(LimitsConfig).keys(), key)

    def rate(name: str, default: float) -> float:
        return _seconds(t, name, key, default, zero_ok=True, what="a number per second")

    return LimitsConfig(
        connections_per_peer=_int(
            t, "connections_per_peer", key, d.connections_per_peer, minimum=0
        ),
        connection_rate=rate("connection_rate", d.connection_rate),
        connection_burst=_int(t, "connection_burst", key, d.connection_burst, minimum=1),
        messages_per_client=rate("messages_per_client", d.messages_per_client),
        client_burst=_int(t, "client_burst", key, d.client_burst, minimum=1),
        messages_per_sender=rate("messages_per_sender", d.messages_per_sender),
        sender_burst=_int(t, "sender_burst", key, d.sender_burst, minimum=1),
        max_tracked_keys=_int(t, "max_tracked_keys", key, d.max_tracked_keys, minimum=1),
    )


def _parse_http(t: Mapping[str, Any], key: str) -> HTTPConfig:
    d = HTTPConfig()
    _no_unknown_keys(t, attrs.fields_dict(HTTPConfig).keys(), key)
    listen = _str(t, "listen", key, d.listen)
    _check_server_endpoint(listen, f"{key}.listen", loopback_only=True, proxy_ok=False)
    return HTTPConfig(
        listen=listen, drain_time=_seconds(t, "drain_time", key, d.drain_time, zero_ok=True)
    )


def _parse_alerts(t: Mapping[str, Any], key: str) -> AlertsConfig:
    d = AlertsConfig()
    _no_unknown_keys(t, attrs.fields_dict(AlertsConfig).keys(), key)
    clear_ratio = _seconds(t, "clear_ratio", key, d.clear_ratio, what="a number")
    if clear_ratio >= 1:
        raise ConfigError(f"{key}.clear_ratio: must be less than 1 (e.g. 0.8)")
    webhook_url = _optional_str(t, "webhook_url", key)
    webhook_insecure = _bool(t, "webhook_insecure", key, d.webhook_insecure)
    if webhook_url is not None:
        _check_webhook_url(webhook_url, webhook_insecure, f"{key}.webhook_url")
    mail_to = _optional_str(t, "mail_to", key)
    mail_from = _optional_str(t, "mail_from", key)
    for name, value in (("mail_to", mail_to), ("mail_from", mail_from)):
        if value is not None and not _is_plain_address(value):
            raise ConfigError(f"{key}.{name}: not a mail address: {value!r}")
    check_interval = _seconds(t, "check_interval", key, d.check_interval)
    if check_interval < 0.1:
        # (Each reading keeps a chart point for an hour: 36 000 at the floor.)
        raise ConfigError(f"{key}.check_interval: must be at least 0.1")
    return AlertsConfig(
        check_interval=check_interval,
        backlog=_int(t, "backlog", key, d.backlog, minimum=0),
        oldest_age=_seconds(t, "oldest_age", key, d.oldest_age, zero_ok=True),
        disk_free=(_int(t, "disk_free", key, 0, minimum=0) if "disk_free" in t else d.disk_free),
        provider_down=_bool(t, "provider_down", key, d.provider_down),
        clear_ratio=clear_ratio,
        clear_after=_seconds(t, "clear_after", key, d.clear_after, zero_ok=True),
        repeat_interval=_seconds(t, "repeat_interval", key, d.repeat_interval, zero_ok=True),
        webhook_url=webhook_url,
        webhook_insecure=webhook_insecure,
        webhook_timeout=_seconds(t, "webhook_timeout", key, d.webhook_timeout),
        webhook_retries=_int(t, "webhook_retries", key, d.webhook_retries, minimum=0, maximum=10),
        mail_to=mail_to,
        mail_from=mail_from,
    )


def _check_webhook_url(url: str, insecure: bool, key: str) -> None:
    # The URL is never repeated in these errors: a webhook's path often carries its token.
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise ConfigError(f"{key}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: must be an http:// or https:// URL")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"{key}: must be ASCII without spaces (percent-encode the rest)")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{key}: user:password@ in the URL is not supported")
    if parts.scheme == "http" and not insecure and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"{key}: http:// to a host that is not loopback sends the URL's token in clear;"
            " use https://, or set alerts.webhook_insecure = true"
        )


def _is_plain_address(value: str) -> bool:
    """local@domain in printable ASCII, no spaces or angle brackets: it goes into MAIL FROM,
    RCPT TO and headers as it is."""
    local, at, domain = value.rpartition("@")
    return (
        bool(at and local and domain)
        and "@" not in local
        and value.isascii()
        and value.isprintable()
        and not any(c in value for c in ' <>"(),;:\\[]')
        and len(value) <= 254
    )


def _parse_log(t: Mapping[str, Any], key: str) -> LogConfig:
    _no_unknown_keys(t, attrs.fields_dict(LogConfig).keys(), key)
    return LogConfig(format=_choice(t, "format", key, "text", ("text", "json")))  # type: ignore[arg-type]


def _parse_spool(t: Mapping[str, Any], key: str) -> SpoolConfig:
    d = SpoolConfig()
    _no_unknown_keys(t, attrs.fields_dict(SpoolConfig).keys(), key)
    retry_initial = _seconds(t, "retry_initial", key, d.retry_initial)
    retry_max = _seconds(t, "retry_max", key, d.retry_max)
    if retry_max < retry_initial:
        raise ConfigError(f"{key}.retry_max: must not be less than {key}.retry_initial")
    return SpoolConfig(
        path=_nonempty_str(t, "path", key, d.path),
        retry_initial=retry_initial,
        retry_max=retry_max,
        max_lifetime=_seconds(t, "max_lifetime", key, d.max_lifetime),
        min_free_space=_int(t, "min_free_space", key, d.min_free_space, minimum=0),
        bounce=_choice(t, "bounce", key, d.bounce, ("dsn", "deadletter")),  # type: ignore[arg-type]
        directory_fsync=_choice(  # type: ignore[arg-type]
            t, "directory_fsync", key, d.directory_fsync, ("auto", "always")
        ),
    )


def _parse_routing(t: Mapping[str, Any], key: str) -> RoutingConfig:
    _no_unknown_keys(t, {"default", "sender_domains"}, key)
    if "default" not in t:
        raise ConfigError(f"{key}.default: required when [routing] is present")
    default = _chain(t["default"], f"{key}.default")
    domains: dict[str, tuple[str, ...]] = {}
    table = _table(t.get("sender_domains", {}), f"{key}.sender_domains")
    for domain, chain in table.items():
        where = f"{key}.sender_domains.{domain}"
        lowered = domain.lower()
        valid = all(c.isascii() and (c.isalnum() or c in "-.") for c in lowered)
        if not lowered or not valid or lowered.startswith(".") or lowered.endswith("."):
            # A trailing dot could never match a sender's domain: refuse it rather than
            # route nothing.
            raise ConfigError(f"{where}: not a valid domain name")
        if lowered in domains:
            raise ConfigError(f"{where}: the domain is listed twice")
        domains[lowered] = _chain(chain, where)
    return RoutingConfig(default=default, sender_domains=domains)


def _chain(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
        raise ConfigError(f"{key}: must be a non-empty list of provider names")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: names a provider twice")
    return tuple(value)


def _parse_provider(t: Mapping[str, Any], key: str) -> ProviderConfig:
    _no_unknown_keys(t, attrs.fields_dict(ProviderConfig).keys(), key)
    if "name" not in t:
        raise ConfigError(f"{key}.name: required")
    name = _nonempty_str(t, "name", key, "")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"{key}.name: use letters, digits, '-', '_' and '.' only")
    kind = _choice(t, "kind", key, "smtp", ("smtp", "maildir"))
    d = ProviderConfig(name=name)
    if kind == "maildir":
        smtp_only = sorted(set(t) - {"name", "kind", "path"})
        if smtp_only:
            raise ConfigError(f"{key}.{smtp_only[0]}: not used by a maildir provider")
        return ProviderConfig(name=name, kind="maildir", path=_nonempty_str(t, "path", key, d.path))

    if "path" in t:
        raise ConfigError(f"{key}.path: only used by a maildir provider")
    if "host" not in t:
        raise ConfigError(f"{key}.host: required for an smtp provider")
    host = _nonempty_str(t, "host", key, d.host)
    tls = _choice(t, "tls", key, d.tls, ("starttls", "implicit", "none"))
    default_port = 465 if tls == "implicit" else 25
    port = _int(t, "port", key, default_port, minimum=1, maximum=65535)
    username = _optional_str(t, "username", key)
    password_env = _optional_str(t, "password_env", key)
    password_file = _optional_str(t, "password_file", key)
    if password_env is not None and password_file is not None:
        raise ConfigError(f"{key}.password_file: set password_env or password_file, not both")
    if username is not None and password_env is None and password_file is None:
        raise ConfigError(f"{key}.username: needs password_env or password_file")
    if username is None and (password_env is not None or password_file is not None):
        raise ConfigError(f"{key}.username: required when a password is configured")
    if username is not None and tls == "none" and not is_loopback_host(host):
        # AUTH never crosses a network in clear text.
        raise ConfigError(
            f"{key}.tls: AUTH to a non-loopback host needs tls = starttls or implicit"
        )
    insecure = _bool(t, "insecure", key, d.insecure)
    if tls == "none" and not is_loopback_host(host) and not insecure:
        raise ConfigError(
            f"{key}.tls: 'none' is only allowed for a loopback upstream (or with insecure = true)"
        )
    if insecure and tls != "none":
        raise ConfigError(f"{key}.insecure: only means something with tls = 'none'")
    ca_file = _optional_file(t, "ca_file", key)
    client_cert = _optional_file(t, "client_cert", key)
    client_key = _optional_file(t, "client_key", key)
    if client_key is not None and client_cert is None:
        raise ConfigError(f"{key}.client_key: needs client_cert")
    if tls == "none":
        for tls_key in ("ca_file", "client_cert", "tls_name"):
            if tls_key in t:
                raise ConfigError(f"{key}.{tls_key}: not used with tls = 'none'")
    tls_name = _hostname(t, "tls_name", key, host) if "tls_name" in t else None
    if password_file is not None and not os.path.isfile(password_file):
        raise ConfigError(f"{key}.password_file: no such file {password_file!r}")
    mechanisms = _str_list(t, "auth_mechanisms", key, d.auth_mechanisms)
    for i, mechanism in enumerate(mechanisms):
        if mechanism.upper() not in ("PLAIN", "LOGIN", "CRAM-MD5"):
            raise ConfigError(
                f"{key}.auth_mechanisms[{i}]: must be PLAIN, LOGIN or CRAM-MD5 (got {mechanism!r})"
            )
    breaker_cooldown = _seconds(t, "breaker_cooldown", key, d.breaker_cooldown)
    breaker_max_cooldown = _seconds(t, "breaker_max_cooldown", key, d.breaker_max_cooldown)
    if breaker_max_cooldown < breaker_cooldown:
        raise ConfigError(f"{key}.breaker_max_cooldown: must not be less than breaker_cooldown")
    provider = ProviderConfig(
        name=name,
        kind="smtp",
        host=host,
        port=port,
        tls=tls,  # type: ignore[arg-type]
        ca_file=ca_file,
        username=username,
        password_env=password_env,
        password_file=password_file,
        helo=_hostname(t, "helo", key, _default_hostname()),
        connections=_int(t, "connections", key, d.connections, minimum=1, maximum=100),
        max_messages_per_connection=_int(
            t, "max_messages_per_connection", key, d.max_messages_per_connection, minimum=1
        ),
        idle_timeout=_seconds(t, "idle_timeout", key, d.idle_timeout),
        connect_timeout=_seconds(t, "connect_timeout", key, d.connect_timeout),
        greeting_timeout=_seconds(t, "greeting_timeout", key, d.greeting_timeout),
        command_timeout=_seconds(t, "command_timeout", key, d.command_timeout),
        data_timeout=_seconds(t, "data_timeout", key, d.data_timeout),
        final_timeout=_seconds(t, "final_timeout", key, d.final_timeout),
        keepalive=_seconds(t, "keepalive", key, d.keepalive, zero_ok=True),
        max_connection_age=_seconds(t, "max_connection_age", key, d.max_connection_age),
        tls_name=tls_name,
        client_cert=client_cert,
        client_key=client_key,
        insecure=insecure,
        auth_mechanisms=tuple(m.upper() for m in mechanisms),
        on_temporary=_choice(t, "on_temporary", key, d.on_temporary, ("next", "defer")),  # type: ignore[arg-type]
        on_permanent=_choice(t, "on_permanent", key, d.on_permanent, ("fail", "next")),  # type: ignore[arg-type]
        batch_size=_int(t, "batch_size", key, d.batch_size, minimum=0, maximum=1000),
        batch_delay=_seconds(t, "batch_delay", key, d.batch_delay, zero_ok=True),
        rate=_seconds(t, "rate", key, d.rate, zero_ok=True, what="a number per second"),
        recipient_rate=_seconds(
            t, "recipient_rate", key, d.recipient_rate, zero_ok=True, what="a number per second"
        ),
        daily_quota=_int(t, "daily_quota", key, d.daily_quota, minimum=0),
        breaker_threshold=_int(t, "breaker_threshold", key, d.breaker_threshold, minimum=1),
        breaker_cooldown=breaker_cooldown,
        breaker_max_cooldown=breaker_max_cooldown,
    )
    # Load the CA bundle, client certificate and key now, as the relay will: a file that is
    # unreadable, not PEM, encrypted or mismatched is a config error here, not a traceback.
    from mailrelay.outbound.tls import tls_material_error

    tls_error = tls_material_error(provider)
    if tls_error is not None:
        raise ConfigError(f"{key}.{tls_error.key}: {tls_error.detail}")
    return provider


# -- value checks ------------------------------------------------------------------------------


def _table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table")
    return value


def _no_unknown_keys(t: Mapping[str, Any], known: Any, key: str) -> None:
    for name in t:
        if name not in known:
            where = f"{key}.{name}" if key else name
            raise ConfigError(f"{where}: unknown key")


def _str(t: Mapping[str, Any], name: str, key: str, default: str) -> str:
    value = t.get(name, default)
    if not isinstance(value, str):
        raise ConfigError(f"{key}.{name}: must be a string")
    return value


def _nonempty_str(t: Mapping[str, Any], name: str, key: str, default: str) -> str:
    value = _str(t, name, key, default)
    if not value:
        raise ConfigError(f"{key}.{name}: must not be empty")
    return value


def _optional_str(t: Mapping[str, Any], name: str, key: str) -> str | None:
    if name not in t:
        return None
    return _nonempty_str(t, name, key, "")


def _hostname(t: Mapping[str, Any], name: str, key: str, default: str) -> str:
    value = _nonempty_str(t, name, key, default)
    # It goes into banners and EHLO lines: letters, digits, dots, dashes, and nothing else.
    if len(value) > 253 or not all(c.isascii() and (c.isalnum() or c in "-.") for c in value):
        raise ConfigError(f"{key}.{name}: not a valid host name: {value!r}")
    return value


def _choice(
    t: Mapping[str, Any], name: str, key: str, default: str, choices: tuple[str, ...]
) -> str:
    value = _str(t, name, key, default)
    if value not in choices:
        raise ConfigError(f"{key}.{name}: must be one of {', '.join(choices)} (got {value!r})")
    return value


def _int(
    t: Mapping[str, Any],
    name: str,
    key: str,
    default: int,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    value = t.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}.{name}: must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}.{name}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}.{name}: must be at most {maximum}")
    return value


def _seconds(
    t: Mapping[str, Any],
    name: str,
    key: str,
    default: float,
    zero_ok: bool = False,
    what: str = "a number of seconds",
) -> float:
    value = t.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}.{name}: must be {what}")
    try:
        value = float(value)  # an integer of 400 digits does not fit
    except OverflowError:
        raise ConfigError(f"{key}.{name}: too large") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{key}.{name}: must be a finite number")
    if zero_ok and value < 0:
        raise ConfigError(f"{key}.{name}: must not be negative")
    if not zero_ok and value <= 0:
        raise ConfigError(f"{key}.{name}: must be greater than 0")
    return float(value)


def _bool(t: Mapping[str, Any], name: str, key: str, default: bool) -> bool:
    value = t.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}.{name}: must be true or false")
    return value


def _optional_file(t: Mapping[str, Any], name: str, key: str) -> str | None:
    value = _optional_str(t, name, key)
    if value is not None and not os.path.isfile(value):
        raise ConfigError(f"{key}.{name}: no such file {value!r}")
    return value


def _str_list(t: Mapping[str, Any], name: str, key: str, default: tuple[str, ...]) -> list[str]:
    value = t.get(name, list(default))
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}.{name}: must be a non-empty list of strings")
    return value


def _endpoint_list(
    t: Mapping[str, Any], name: str, key: str, default: tuple[str, ...]
) -> tuple[str, ...]:
    value = t.get(name, list(default))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}.{name}: must be an endpoint string or a non-empty list of them")
    return tuple(value)


def _networks(t: Mapping[str, Any], name: str, key: str) -> tuple[str, ...]:
    """A list of CIDRs (may be empty), each checked and written in its normal form."""
    value = t.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{key}.{name}: must be a list of networks, e.g. ["10.0.0.0/8"]')
    networks: list[str] = []
    for i, text in enumerate(value):
        try:
            network = str(parse_network(text))
        except ValueError as e:
            raise ConfigError(f"{key}.{name}[{i}]: {e}") from None
        if network in networks:
            raise ConfigError(f"{key}.{name}[{i}]: {text!r} is listed twice")
        networks.append(network)
    return tuple(networks)


def _check_server_endpoint(
    description: str, key: str, loopback_only: bool, hint: str = "", proxy_ok: bool = True
) -> None:
    """Check an endpoint string without opening it: syntax, and that it stays on loopback.

    A ``haproxy:`` endpoint is checked by the socket under it (HAProxy must reach us on
    loopback, or from smtp.allow_networks); only the SMTP listeners understand PROXY headers.
    """
    from mailrelay.endpoints import EndpointError, parse_server_endpoint

    try:
        listen = parse_server_endpoint(description)
    except EndpointError as e:
        raise ConfigError(f"{key}: {e}") from None
    if listen.proxied and not proxy_ok:
        raise ConfigError(f"{key}: haproxy: endpoints are only supported in smtp.listen")
    if loopback_only and listen.interface is not None and not is_loopback_host(listen.interface):
        raise ConfigError(
            f"{key}: listens on {listen.interface}, which is not a loopback address{hint}"
        )
