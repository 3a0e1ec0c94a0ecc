"""Config: every key optional, every error one line that names its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs
import pytest

from mailrelay.cli.main import render_config
from mailrelay.config import Config, ConfigError, load, parse
from mailrelay.endpoints import EndpointError, parse_server_endpoint
from mailrelay.netaddr import is_loopback_host


def parse_text(text: str) -> Config:
    return parse(tomllib.loads(text))


def test_no_file_is_the_embedded_default() -> None:
    config = load(None)
    assert config.is_embedded_default
    assert config.smtp.listen == ("tcp:2525:interface=127.0.0.1", r"tcp6:2525:interface=\:\:1")
    assert config.http.listen == "tcp:8025:interface=127.0.0.1"
    assert [(p.name, p.kind) for p in config.providers] == [("local", "maildir")]
    assert config.routing.default == ("local",)


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    config = load(path)
    assert config.source == str(path) and config.spool.path == "spool"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 104_857_600),  # 100 MiB
        ("[spool]\nmin_free_space = 1073741824\n", 1_073_741_824),
        ("[spool]\nmin_free_space = 0\n", 0),  # the check is off
    ],
)
def test_spool_min_free_space(text: str, expected: int) -> None:
    assert parse_text(text).spool.min_free_space == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "auto"), ("[spool]\ndirectory_fsync = 'always'\n", "always")],
)
def test_spool_directory_fsync(text: str, expected: str) -> None:
    assert parse_text(text).spool.directory_fsync == expected


def test_providers_without_routing_chain_in_written_order() -> None:
    config = parse_text(
        "[[providers]]\nname='a'\nhost='127.0.0.1'\ntls='none'\n"
        "[[providers]]\nname='b'\nhost='smtp.example.com'\nport=587\n"
    )
    assert config.routing.default == ("a", "b")
    assert config.provider("b").tls == "starttls" and config.provider("b").port == 587
    assert config.provider("a").port == 25


def test_implicit_tls_defaults_to_port_465() -> None:
    config = parse_text("[[providers]]\nname='a'\nhost='smtp.example.com'\ntls='implicit'\n")
    assert config.provider("a").port == 465


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[smtp]\nlisten = 25\n",
            "smtp.listen: must be an endpoint string or a non-empty list of them",
        ),
        ("[smtp]\nlisten = ['tcp:abc']\n", "smtp.listen[0]: not a valid endpoint string"),
        (
            "[smtp]\nlisten = ['tcp:2525']\n",
            "smtp.listen[0]: listens on 0.0.0.0, which is not a loopback address",
        ),
        (
            "[smtp]\nlisten = ['tcp:2525:interface=10.1.2.3']\n",
            "smtp.listen[0]: listens on 10.1.2.3",
        ),
        ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients: must be at least 1"),
        (
            "[smtp]\nlisten = ['haproxy:tcp:2525']\n",
            "smtp.listen[0]: listens on 0.0.0.0, which is not a loopback address",
        ),
        ("[smtp]\nmax_recipients = true\n", "smtp.max_recipients: must be an integer"),
        ("[smtp]\nhostname = 'bad host'\n", "smtp.hostname: not a valid host name"),
        ("[smtp]\ncolour = 1\n", "smtp.colour: unknown key"),
        ("[http]\nlisten = 'tcp:8025'\n", "http.listen: listens on 0.0.0.0"),
        ("[spool]\nretry_initial = 0\n", "spool.retry_initial: must be greater than 0"),
        (
            "[spool]\nretry_initial = 10\nretry_max = 5\n",
            "spool.retry_max: must not be less than spool.retry_initial",
        ),
        ("[spool]\npath = ''\n", "spool.path: must not be empty"),
        ("[spool]\nbounce = 'never'\n", "spool.bounce: must be one of dsn, deadletter"),
        (
            "[spool]\ndirectory_fsync = 'never'\n",
            "spool.directory_fsync: must be one of auto, always",
        ),
        ("[spool]\nmin_free_space = -1\n", "spool.min_free_space: must be at least 0"),
        ("[spool]\nmin_free_space = '100M'\n", "spool.min_free_space: must be an integer"),
        ("[spool]\nmin_free_space = 1.5e8\n", "spool.min_free_space: must be an integer"),
        ("[spool]\nmin_free_space = true\n", "spool.min_free_space: must be an integer"),
        ("providers = []\n", "providers: must be a non-empty array of tables"),
        ("[[providers]]\nhost = 'x'\n", "providers[0].name: required"),
        ("[[providers]]\nname = 'a b'\nhost = 'x'\n", "providers[0].name: use letters"),
        ("[[providers]]\nname = 'a'\n", "providers[0].host: required for an smtp provider"),
        (
            "[[providers]]\nname = 'a'\nhost = '127.0.0.1'\nport = 70000\n",
            "providers[0].port: must be at most 65535",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = '127.0.0.1'\ntls = 'maybe'\n",
            "providers[0].tls: must be one of starttls, implicit, none",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'smtp.example.com'\ntls = 'none'\n",
            "providers[0].tls: 'none' is only allowed for a loopback upstream",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nusername = 'u'\n",
            "providers[0].username: needs password_env or password_file",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\npassword_env = 'P'\n",
            "providers[0].username: required when a password is configured",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nusername = 'u'\n"
            "password_env = 'P'\npassword_file = '/f'\n",
            "providers[0].password_file: set password_env or password_file, not both",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nca_file = '/nonexistent/ca.pem'\n",
            "providers[0].ca_file: no such file",
        ),
        (
            "[[providers]]\nname = 'a'\nkind = 'maildir'\nhost = 'x'\n",
            "providers[0].host: not used by a maildir provider",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\npath = 'M'\n",
            "providers[0].path: only used by a maildir provider",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\n"
            "[[providers]]\nname = 'a'\nhost = 'y.example'\n",
            "providers[1].name: duplicate provider name 'a'",
        ),
        ("[routing]\ndefault = ['nope']\n", "routing.default[0]: no provider named 'nope'"),
        (
            "[routing]\ndefault = []\n",
            "routing.default: must be a non-empty list of provider names",
        ),
        ("[routing]\n", "routing.default: required when [routing] is present"),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\n"
            "[routing]\ndefault = ['a']\n[routing.sender_domains]\n'b.example' = ['zz']\n",
            "routing.sender_domains.b.example[0]: no provider named 'zz'",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\n"
            "[routing]\ndefault = ['a']\n[routing.sender_domains]\n'b example' = ['a']\n",
            "routing.sender_domains.b example: not a valid domain name",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\ntls = 'none'\n",
            "providers[0].tls: 'none' is only allowed for a loopback upstream (or with insecure",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\ninsecure = true\n",
            "providers[0].insecure: only means something with tls = 'none'",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\ntls = 'none'\ninsecure = true\n"
            "username = 'u'\npassword_env = 'P'\n",
            "providers[0].tls: AUTH to a non-loopback host needs tls = starttls or implicit",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nkeepalive = 1" + "0" * 400 + "\n",
            "providers[0].keepalive: too large",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\n"
            "[routing]\ndefault = ['a']\n[routing.sender_domains]\n'b.example.' = ['a']\n",
            "routing.sender_domains.b.example.: not a valid domain name",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nrate = -1\n",
            "providers[0].rate: must not be negative",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nrate = 'fast'\n",
            "providers[0].rate: must be a number per second",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\non_temporary = 'retry'\n",
            "providers[0].on_temporary: must be one of next, defer (got 'retry')",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nauth_mechanisms = ['XOAUTH2']\n",
            "providers[0].auth_mechanisms[0]: must be PLAIN, LOGIN or CRAM-MD5",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nclient_cert = '/nonexistent/c.pem'\n",
            "providers[0].client_cert: no such file '/nonexistent/c.pem'",
        ),
        (
            "[[providers]]\nname = 'a'\nhost = 'x.example'\nbreaker_cooldown = 60\n"
            "breaker_max_cooldown = 10\n",
            "providers[0].breaker_max_cooldown: must not be less than breaker_cooldown",
        ),
        ("[log]\nformat = 'xml'\n", "log.format: must be one of text, json (got 'xml')"),
        (
            "[alerts]\nwebhook_url = 'ftp://x/token'\n",
            "alerts.webhook_url: must be an http:// or https:// URL",
        ),
        (
            "[alerts]\nmail_to = 'not an address'\n",
            "alerts.mail_to: not a mail address: 'not an address'",
        ),
        ("[alerts]\nclear_ratio = 1.5\n", "alerts.clear_ratio: must be less than 1 (e.g. 0.8)"),
        ("[alerts]\nbacklog = -1\n", "alerts.backlog: must be at least 0"),
        ("[alerts]\ncheck_interval = 0.01\n", "alerts.check_interval: must be at least 0.1"),
        (
            "[alerts]\nwebhook_url = 'https://bot:SECRET@hooks.example.com/x'\n",
            "alerts.webhook_url: user:password@ in the URL is not supported",
        ),
        (
            "[alerts]\nwebhook_url = 'http://hooks.example.com/SECRET'\n",
            "alerts.webhook_url: http:// to a host that is not loopback sends the URL's token"
            " in clear; use https://, or set alerts.webhook_insecure = true",
        ),
        (
            "[alerts]\nwebhook_url = 'https://h\u00f6oks.example.com/SECRET'\n",
            "alerts.webhook_url: must be ASCII without spaces (percent-encode the rest)",
        ),
        ("[alerts]\nmail_to = 'a@b@example.com'\n", "alerts.mail_to: not a mail address"),
        (
            "[smtp]\nlisten = ['tcp:2525']\n",
            "(set smtp.allow_networks to accept clients from other networks)",
        ),
        (
            "[smtp]\nallow_networks = '10.0.0.0/8'\n",
            "smtp.allow_networks: must be a list of networks",
        ),
        (
            "[smtp]\nallow_networks = ['10.0.0.0/8', 'ten']\n",
            "smtp.allow_networks[1]: not an IP address or network (CIDR): 'ten'",
        ),
        (
            "[smtp]\nallow_networks = ['10.0.0.1/8']\n",
            "smtp.allow_networks[0]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)",
        ),
        ("[smtp]\nallow_networks = ['0.0.0.0/0']\n", "smtp.allow_networks[0]: '0.0.0.0/0' would"),
        ("[smtp]\nallow_networks = ['::/0']\n", "smtp.allow_networks[0]: '::/0' would admit"),
        (
            "[smtp]\nallow_networks = ['::ffff:10.0.0.0/104']\n",
            "smtp.allow_networks[0]: '::ffff:10.0.0.0/104' is IPv4-mapped",
        ),
        (
            "[smtp]\nallow_networks = ['10.0.0.0/8', '10.0.0.0/8']\n",
            "smtp.allow_networks[1]: '10.0.0.0/8' is listed twice",
        ),
        (
            "[smtp]\nallow_networks = ['10.0.0.0/8']\n[http]\nlisten = 'tcp:8025'\n",
            "http.listen: listens on 0.0.0.0",  # allow_networks is for SMTP only
        ),
        (
            "[limits]\nconnections_per_peer = -1\n",
            "limits.connections_per_peer: must be at least 0",
        ),
        (
            "[limits]\nmessages_per_client = -1\n",
            "limits.messages_per_client: must not be negative",
        ),
        (
            "[limits]\nmessages_per_sender = 'fast'\n",
            "limits.messages_per_sender: must be a number per second",
        ),
        ("[limits]\nconnection_rate = nan\n", "limits.connection_rate: must be a finite number"),
        ("[limits]\nclient_burst = 0\n", "limits.client_burst: must be at least 1"),
        ("[limits]\nsender_burst = 1.5\n", "limits.sender_burst: must be an integer"),
        ("[limits]\nconnection_burst = 0\n", "limits.connection_burst: must be at least 1"),
        ("[limits]\nmax_tracked_keys = 0\n", "limits.max_tracked_keys: must be at least 1"),
        ("[limits]\nper_ip = 3\n", "limits.per_ip: unknown key"),
        ("limits = 3\n", "limits: must be a table"),
        ("smtp = 3\n", "smtp: must be a table"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_text(text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert "SECRET" not in str(error.value)  # a webhook token is never repeated


def test_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[smtp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(broken)


def test_password_is_read_from_the_environment_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_text(
        "[[providers]]\nname='a'\nhost='smtp.example.com'\nusername='u'\npassword_env='MR_TEST_PW'\n"
    )
    monkeypatch.setenv("MR_TEST_PW", "s3cret")
    assert config.provider("a").password() == "s3cret"
    assert "s3cret" not in repr(config)


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    config = parse_text(
        f"[[providers]]\nname='a'\nhost='smtp.example.com'\nusername='u'\npassword_file='{secret}'\n"
    )
    assert config.provider("a").password() == "from-file"


def test_shaping_and_policy_keys() -> None:
    config = parse_text(
        "[[providers]]\nname='a'\nhost='10.0.0.1'\ntls='none'\ninsecure=true\n"
        "batch_size=0\nbatch_delay=0\nrate=0.5\nrecipient_rate=100\ndaily_quota=50000\n"
        "on_temporary='defer'\non_permanent='next'\nauth_mechanisms=['login','plain']\n"
        "keepalive=0\n"
    )
    a = config.provider("a")
    assert (a.batch_size, a.batch_delay, a.rate, a.recipient_rate, a.daily_quota) == (
        0,
        0.0,
        0.5,
        100.0,
        50000,
    )
    assert (a.on_temporary, a.on_permanent, a.insecure, a.keepalive) == ("defer", "next", True, 0.0)
    assert a.auth_mechanisms == ("LOGIN", "PLAIN")


def test_limits_defaults() -> None:
    limits = parse_text("").limits
    assert limits.connections_per_peer == 50
    assert (limits.connection_rate, limits.connection_burst) == (0.0, 20)
    assert (limits.messages_per_client, limits.client_burst) == (0.0, 50)
    assert (limits.messages_per_sender, limits.sender_burst) == (0.0, 50)
    assert limits.max_tracked_keys == 100_000
    assert parse_text("").smtp.allow_networks == ()


def test_limits_keys() -> None:
    limits = parse_text(
        "[limits]\nconnections_per_peer = 0\nconnection_rate = 2\nconnection_burst = 5\n"
        "messages_per_client = 0.5\nclient_burst = 10\nmessages_per_sender = 1\n"
        "sender_burst = 3\nmax_tracked_keys = 5000\n"
    ).limits
    assert limits.connections_per_peer == 0
    assert (limits.connection_rate, limits.connection_burst) == (2.0, 5)
    assert (limits.messages_per_client, limits.client_burst) == (0.5, 10)
    assert (limits.messages_per_sender, limits.sender_burst) == (1.0, 3)
    assert limits.max_tracked_keys == 5000


def test_non_loopback_listen_needs_allow_networks() -> None:
    config = parse_text(
        "[smtp]\nlisten = ['tcp:2525:interface=10.1.2.3', 'tcp6:2525']\n"
        "allow_networks = ['10.0.0.0/8', '2001:DB8::/32', '192.0.2.7']\n"
    )
    assert config.smtp.allow_networks == ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32")
    assert config.smtp.listen == ("tcp:2525:interface=10.1.2.3", "tcp6:2525")
    # Loopback listeners with allow_networks set are fine too (nothing else can reach them).
    assert (
        parse_text("[smtp]\nallow_networks = ['10.0.0.0/8']\n").smtp.listen[0].endswith("127.0.0.1")
    )


def test_sender_domain_chains() -> None:
    config = parse_text(
        "[[providers]]\nname='a'\nhost='a.example'\n[[providers]]\nname='b'\nhost='b.example'\n"
        "[routing]\ndefault=['a','b']\n[routing.sender_domains]\n'Brand.Example'=['b']\n"
    )
    assert config.routing.default == ("a", "b")
    assert config.routing.sender_domains == {"brand.example": ("b",)}


def test_rendered_config_parses_back_to_the_same_values() -> None:
    config = parse_text(
        "[[providers]]\nname='ses'\nhost='email-smtp.example.com'\nport=587\n"
        "username='AKIA'\npassword_env='MR_UNSET'\nrate=14\n"
        "[routing]\ndefault=['ses']\n[routing.sender_domains]\n'brand.example'=['ses']\n"
    )
    rendered = render_config(config)
    assert "# NOT SET in this environment" in rendered
    assert "min_free_space = 104857600" in rendered
    again = parse(tomllib.loads(rendered))
    assert again.providers == config.providers
    assert again.smtp == config.smtp and again.spool == config.spool
    assert again.routing == config.routing
    with_networks = parse_text("[smtp]\nlisten='tcp:2525'\nallow_networks=['10.0.0.0/8']\n")
    again = parse(tomllib.loads(render_config(with_networks)))
    assert again.smtp == with_networks.smtp


def test_rendered_alerts_hide_the_webhook_token() -> None:
    config = parse_text(
        "[alerts]\nbacklog = 5\nmail_to = 'ops@example.com'\n"
        "webhook_url = 'https://hooks.example.com/services/T0/SECRET?token=XYZ'\n"
        "[log]\nformat = 'json'\n"
    )
    rendered = render_config(config)
    assert '# webhook_url = "https://hooks.example.com:443/..." (path hidden)' in rendered
    assert "SECRET" not in rendered and "XYZ" not in rendered
    again = parse(tomllib.loads(rendered))
    assert again.alerts == attrs.evolve(config.alerts, webhook_url=None)
    assert again.log.format == "json"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("::1%lo", True),
        (b"127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("example.com", False),
        (b"\xff", False),
    ],
)
def test_loopback_hosts(host: str | bytes, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_endpoint_parsing() -> None:
    assert parse_server_endpoint(r"tcp6:2525:interface=\:\:1").interface == "::1"
    assert parse_server_endpoint("tcp:25").interface == "0.0.0.0"
    assert parse_server_endpoint("unix:/run/mailrelay.sock:mode=660").interface is None
    # Behind HAProxy the socket's own address is checked here; the client's at connect time.
    proxied = parse_server_endpoint("haproxy:tcp:2525:interface=127.0.0.1")
    assert (proxied.proxied, proxied.interface) == (True, "127.0.0.1")
    assert proxied.endpoint == "tcp:2525:interface=127.0.0.1"
    with pytest.raises(EndpointError):
        parse_server_endpoint("carrier-pigeon:1")


def test_tls_files_are_loaded_when_the_config_is_read(tmp_path: Path) -> None:
    """A CA bundle, client certificate or key the relay could not use is a config error
    naming the key, not a traceback at start; a bundle's every CA is trusted."""
    import trustme

    ca, other = trustme.CA(), trustme.CA()
    issued = ca.issue_cert("client.example")
    cert = tmp_path / "cert.pem"
    cert.write_bytes(issued.cert_chain_pems[0].bytes())
    key = tmp_path / "key.pem"
    key.write_bytes(issued.private_key_pem.bytes())
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(other.issue_cert("x.example").private_key_pem.bytes())
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.cert_pem.bytes() + ca.cert_pem.bytes())
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate\n")
    base = "[[providers]]\nname = 'a'\nhost = 'x.example'\n"

    config = parse_text(
        base + f"ca_file = '{bundle}'\nclient_cert = '{cert}'\nclient_key = '{key}'\n"
    )
    assert config.provider("a").client_key == str(key)
    for extra, message in [
        (f"ca_file = '{junk}'\n", "providers[0].ca_file: no PEM certificate in"),
        (f"client_cert = '{junk}'\nclient_key = '{key}'\n", "providers[0].client_cert: no valid"),
        (f"client_cert = '{cert}'\n", "providers[0].client_key: no usable PEM private key"),
        (
            f"client_cert = '{cert}'\nclient_key = '{other_key}'\n",
            "providers[0].client_key: the private key does not match client_cert",
        ),
    ]:
        with pytest.raises(ConfigError) as error:
            parse_text(base + extra)
        assert message in str(error.value)
