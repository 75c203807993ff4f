"""Settings: defaults, TOML file, GATEWAY_* overrides, conversion, validation, redaction."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import (
    SECTIONS,
    CacheSettings,
    LimitSettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
    load_settings,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "gateway.example.toml"
UPSTREAM = {
    "GATEWAY_UPSTREAM__URL": "https://isales.example.com:28080",
    "GATEWAY_UPSTREAM__AK": "the-ak",
    "GATEWAY_UPSTREAM__SK": "the-sk",
    "GATEWAY_AUTH__ENABLED": "false",
}


def toml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(env: dict[str, str] | None = None, path: Path | None = None) -> Settings:
    """Settings from ``env`` only (never the test runner's environment), upstream optional."""
    return load_settings(path, env or {}, require_upstream=False)


def config_error(env: dict[str, str], path: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, {**UPSTREAM, **env})
    return info.value


def test_nothing_configured_gives_the_documented_defaults() -> None:
    settings = load()
    assert settings == Settings()
    assert settings.server == ServerSettings("0.0.0.0", 8080, 8192, 15.0)
    assert settings.upstream.signed_headers == ("host",)
    assert settings.upstream.timestamp_format == "seconds"
    assert settings.limit == LimitSettings(10, 1000, 100, 250, 30000, 1)
    assert settings.cache == CacheSettings(True, 86400.0, 30.0, 3600.0, 0.0, 10.0, 10000)
    assert (settings.log.level, settings.log.format) == ("INFO", "text")
    assert settings.embedded


def test_a_complete_upstream_passes_the_required_checks() -> None:
    settings = load_settings(None, UPSTREAM)
    assert (settings.upstream.ak, settings.upstream.sk) == ("the-ak", "the-sk")
    assert settings.upstream_host == "isales.example.com:28080"


def test_the_process_environment_is_read_when_no_environ_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "9001")
    assert load_settings(require_upstream=False).server.port == 9001


def test_the_environment_overrides_the_file_which_overrides_the_defaults(tmp_path: Path) -> None:
    path = toml_file(
        tmp_path, "[server]\nport = 9000\nhost = '127.0.0.1'\n[limit]\nmargin_ms = 50\n"
    )
    settings = load({"GATEWAY_SERVER__PORT": "9100"}, path)
    assert settings.server.port == 9100
    assert settings.server.host == "127.0.0.1"
    assert settings.limit.margin_ms == 50
    assert settings.limit.window_ms == 1000


@pytest.mark.parametrize(
    ("variable", "text", "expected"),
    [
        ("GATEWAY_SERVER__PORT", "9000", 9000),
        ("GATEWAY_SERVER__SHUTDOWN_TIMEOUT_S", "2.5", 2.5),
        ("GATEWAY_SERVER__SHUTDOWN_TIMEOUT_S", "3", 3.0),
        ("GATEWAY_UPSTREAM__VERIFY_TLS", "false", False),
        ("GATEWAY_UPSTREAM__VERIFY_TLS", "No", False),
        ("GATEWAY_UPSTREAM__VERIFY_TLS", "0", False),
        ("GATEWAY_CACHE__ENABLED", "TRUE", True),
        ("GATEWAY_CACHE__ENABLED", "yes", True),
        ("GATEWAY_CACHE__ENABLED", "1", True),
        ("GATEWAY_UPSTREAM__LOCALE", "en_US", "en_US"),
        (
            "GATEWAY_UPSTREAM__SIGNED_HEADERS",
            "content-length, content-type,,host,",
            ("content-length", "content-type", "host"),
        ),
        ("GATEWAY_UPSTREAM__TIMESTAMP_FORMAT", "milliseconds", "milliseconds"),
    ],
)
def test_environment_strings_are_converted_by_the_field_type(
    variable: str, text: str, expected: object
) -> None:
    section, key = variable.removeprefix("GATEWAY_").lower().split("__")
    value = getattr(getattr(load({variable: text}), section), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("variable", "text", "key"),
    [
        ("GATEWAY_SERVER__PORT", "80a", "server.port"),
        ("GATEWAY_SERVER__PORT", "80.0", "server.port"),
        ("GATEWAY_SERVER__SHUTDOWN_TIMEOUT_S", "soon", "server.shutdown_timeout_s"),
        ("GATEWAY_SERVER__SHUTDOWN_TIMEOUT_S", "nan", "server.shutdown_timeout_s"),
        ("GATEWAY_UPSTREAM__VERIFY_TLS", "maybe", "upstream.verify_tls"),
        ("GATEWAY_UPSTREAM__TIMESTAMP_FORMAT", "minutes", "upstream.timestamp_format"),
    ],
)
def test_unconvertible_environment_values_name_the_key(variable: str, text: str, key: str) -> None:
    assert config_error({variable: text}).key == key


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[server]\nport = '8080'", "server.port"),
        ("[server]\nport = true", "server.port"),
        ("[server]\nport = 8080.0", "server.port"),
        ("[server]\nhost = 5", "server.host"),
        ("[upstream]\nverify_tls = 1", "upstream.verify_tls"),
        ("[upstream]\nsigned_headers = 'host'", "upstream.signed_headers"),
        ("[upstream]\nsigned_headers = [1]", "upstream.signed_headers"),
        ("[upstream]\ntimestamp_format = 'minutes'", "upstream.timestamp_format"),
        ("[cache]\nttl_open_s = inf", "cache.ttl_open_s"),
        ("[cache]\nttl_open_s = false", "cache.ttl_open_s"),
    ],
)
def test_wrong_toml_types_are_errors(tmp_path: Path, toml: str, key: str) -> None:
    assert config_error({}, toml_file(tmp_path, toml)).key == key


def test_an_integer_is_accepted_for_a_float_field(tmp_path: Path) -> None:
    stale = load(path=toml_file(tmp_path, "[cache]\nstale_s = 60\n")).cache.stale_s
    assert stale == 60.0
    assert isinstance(stale, float)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"GATEWAY_SERVER__PORT": "0"}, "server.port"),
        ({"GATEWAY_SERVER__PORT": "65536"}, "server.port"),
        ({"GATEWAY_SERVER__MAX_BODY_BYTES": "255"}, "server.max_body_bytes"),
        ({"GATEWAY_SERVER__MAX_BODY_BYTES": "1048577"}, "server.max_body_bytes"),
        ({"GATEWAY_SERVER__SHUTDOWN_TIMEOUT_S": "0"}, "server.shutdown_timeout_s"),
        ({"GATEWAY_UPSTREAM__URL": ""}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__URL": "ftp://isales.example.com"}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__URL": "https://"}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__URL": "isales.example.com"}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__URL": "https://isales.example.com:99999"}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__URL": "https://user:pw@isales.example.com"}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__URL": "http://127.0.0.1:28080"}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__AK": ""}, "upstream.ak"),
        ({"GATEWAY_UPSTREAM__SK": ""}, "upstream.sk"),
        ({"GATEWAY_UPSTREAM__CONNECT_TIMEOUT_MS": "0"}, "upstream.connect_timeout_ms"),
        ({"GATEWAY_UPSTREAM__TIMEOUT_MS": "0"}, "upstream.timeout_ms"),
        (
            {
                "GATEWAY_UPSTREAM__CONNECT_TIMEOUT_MS": "5000",
                "GATEWAY_UPSTREAM__TIMEOUT_MS": "4000",
            },
            "upstream.connect_timeout_ms",
        ),
        ({"GATEWAY_UPSTREAM__CA_FILE": "/nonexistent/ca.pem"}, "upstream.ca_file"),
        ({"GATEWAY_UPSTREAM__SIGNED_HEADERS": ""}, "upstream.signed_headers"),
        ({"GATEWAY_UPSTREAM__SIGNED_HEADERS": "host,authorization"}, "upstream.signed_headers"),
        ({"GATEWAY_REDIS__URL": "http://redis:6379"}, "redis.url"),
        ({"GATEWAY_REDIS__URL": "localhost:6379"}, "redis.url"),
        ({"GATEWAY_REDIS__URL": "redis+cluster://h:7000,h:port"}, "redis.url"),
        ({"GATEWAY_ADMIN__KEY_SHA256": "not-a-digest"}, "admin.key_sha256"),
        ({"GATEWAY_ADMIN__KEY_SHA256": "A" * 64}, "admin.key_sha256"),
        ({"GATEWAY_REDIS__TIMEOUT_MS": "0"}, "redis.timeout_ms"),
        ({"GATEWAY_REDIS__POOL_SIZE": "0"}, "redis.pool_size"),
        ({"GATEWAY_REDIS__POOL_TIMEOUT_MS": "0"}, "redis.pool_timeout_ms"),
        ({"GATEWAY_REDIS__POOL_TIMEOUT_MS": "10001"}, "redis.pool_timeout_ms"),
        ({"GATEWAY_LIMIT__MAX_CONCURRENT": "0"}, "limit.max_concurrent"),
        ({"GATEWAY_LIMIT__WINDOW_MS": "0"}, "limit.window_ms"),
        ({"GATEWAY_LIMIT__MARGIN_MS": "-1"}, "limit.margin_ms"),
        ({"GATEWAY_LIMIT__MAX_QUEUE": "-1"}, "limit.max_queue"),
        ({"GATEWAY_LIMIT__MAX_WAIT_MS": "-1"}, "limit.max_wait_ms"),
        ({"GATEWAY_LIMIT__REPLICAS": "0"}, "limit.replicas"),
        ({"GATEWAY_LIMIT__GRANT_AHEAD_MS": "-1"}, "limit.grant_ahead_ms"),
        ({"GATEWAY_LIMIT__GRANT_AHEAD_MS": "101"}, "limit.grant_ahead_ms"),
        (  # held at most a tenth of the window: a permit granted ahead is sent
            {"GATEWAY_LIMIT__WINDOW_MS": "100", "GATEWAY_LIMIT__MARGIN_MS": "0"},
            "limit.grant_ahead_ms",
        ),
        ({"GATEWAY_CACHE__TTL_CLOSED_S": "-1"}, "cache.ttl_closed_s"),
        ({"GATEWAY_CACHE__TTL_OPEN_S": "-0.5"}, "cache.ttl_open_s"),
        ({"GATEWAY_CACHE__STALE_S": "-1"}, "cache.stale_s"),
        ({"GATEWAY_CACHE__NEGATIVE_TTL_S": "-1"}, "cache.negative_ttl_s"),
        ({"GATEWAY_CACHE__MAX_ENTRIES": "0"}, "cache.max_entries"),
        ({"GATEWAY_LOG__LEVEL": "VERBOSE"}, "log.level"),
        ({"GATEWAY_LOG__FORMAT": "xml"}, "log.format"),
    ],
)
def test_each_broken_rule_names_its_key(env: dict[str, str], key: str) -> None:
    assert config_error(env).key == key


def test_the_edges_of_each_range_are_accepted() -> None:
    settings = load_settings(
        None,
        {
            **UPSTREAM,
            "GATEWAY_SERVER__PORT": "65535",
            "GATEWAY_SERVER__MAX_BODY_BYTES": "1048576",
            "GATEWAY_UPSTREAM__CONNECT_TIMEOUT_MS": "10000",
            "GATEWAY_LIMIT__MARGIN_MS": "0",
            "GATEWAY_LIMIT__MAX_QUEUE": "0",
            "GATEWAY_CACHE__TTL_OPEN_S": "0",
            "GATEWAY_REDIS__POOL_TIMEOUT_MS": "10000",
        },
    )
    assert settings.server.port == 65535
    assert settings.redis.pool_timeout_ms == 10000
    assert settings.upstream.connect_timeout_ms == settings.upstream.timeout_ms


def test_an_http_upstream_needs_allow_http_and_the_error_says_so() -> None:
    error = config_error({"GATEWAY_UPSTREAM__URL": "http://127.0.0.1:28080"})
    assert "set upstream.allow_http = true only for the simulator" in str(error)
    settings = load_settings(
        None,
        {
            **UPSTREAM,
            "GATEWAY_UPSTREAM__URL": "http://127.0.0.1:28080",
            "GATEWAY_UPSTREAM__ALLOW_HTTP": "true",
        },
    )
    assert settings.upstream.url == "http://127.0.0.1:28080"


def test_without_require_upstream_the_url_and_credentials_may_be_empty() -> None:
    assert load().upstream == UpstreamSettings()
    with pytest.raises(ConfigError, match=r"^upstream\.url: "):
        load({"GATEWAY_UPSTREAM__URL": "ftp://x"})


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[serverr]\nport = 1", "serverr"),
        ("[server]\nprot = 1", "server.prot"),
        ("port = 1", "port"),
        ("[upstream.tls]\nverify = true", "upstream.tls"),
        ("server = 1", "server"),
    ],
)
def test_unknown_or_misshapen_names_in_the_file_are_rejected(
    tmp_path: Path, toml: str, key: str
) -> None:
    path = toml_file(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load(path=path)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("GATEWAY_SERVER__PROT", "server.prot"),
        ("GATEWAY_SERVERR__PORT", "serverr.port"),
        ("GATEWAY_UPSTREAM__", "upstream."),
    ],
)
def test_unknown_gateway_variables_are_rejected_naming_the_variable(
    variable: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load({variable: "1"})
    assert info.value.key == key
    assert variable in str(info.value)


def test_gateway_variables_without_a_double_underscore_are_not_settings() -> None:
    assert load({"GATEWAY_CONFIG": "/etc/gateway.toml", "GATEWAYX__Y": "1"}) == Settings()


def test_a_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(path=path)
    assert info.value.key == "config"
    assert str(path) in str(info.value)


def test_a_toml_syntax_error_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = toml_file(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load(path=path)
    assert info.value.key == "config"
    assert str(path) in str(info.value)


def test_credentials_are_read_from_files_without_the_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "ak").write_text("file-ak\n", encoding="utf-8")
    (tmp_path / "sk").write_text("file-sk \r\n", encoding="utf-8")
    env = {
        "GATEWAY_UPSTREAM__URL": "https://isales.example.com",
        "GATEWAY_UPSTREAM__AK_FILE": str(tmp_path / "ak"),
        "GATEWAY_UPSTREAM__SK_FILE": str(tmp_path / "sk"),
        "GATEWAY_AUTH__ENABLED": "false",
    }
    upstream = load_settings(None, env).upstream
    assert (upstream.ak, upstream.sk) == ("file-ak", "file-sk")


def test_caller_authentication_is_required_unless_switched_off_explicitly() -> None:
    env = {k: v for k, v in UPSTREAM.items() if k != "GATEWAY_AUTH__ENABLED"}
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert info.value.key == "auth.callers_file"


def test_a_broken_callers_file_stops_start_up_naming_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "callers.toml"
    path.write_text('[[callers]]\nname = "x"\nkey_sha256 = "abc"\nvdn_ids = [11]\n')
    env = {**UPSTREAM, "GATEWAY_AUTH__ENABLED": "true", "GATEWAY_AUTH__CALLERS_FILE": str(path)}
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert info.value.key == "auth.callers_file: callers[0]"
    assert "key_sha256" in str(info.value)


def test_setting_a_credential_and_its_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "ak").write_text("file-ak\n", encoding="utf-8")
    error = config_error({"GATEWAY_UPSTREAM__AK_FILE": str(tmp_path / "ak")})
    assert error.key == "upstream.ak_file"


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read"), (b"\n", "empty"), (b"\xffsecret-bytes\xfe", "UTF-8")],
)
def test_an_unusable_credential_file_names_the_key_but_not_its_content(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "sk"
    if content is not None:
        path.write_bytes(content)
    error = config_error({"GATEWAY_UPSTREAM__SK": "", "GATEWAY_UPSTREAM__SK_FILE": str(path)})
    assert error.key == "upstream.sk_file"
    assert problem in str(error)
    assert "secret-bytes" not in str(error)


def test_signed_headers_and_log_level_are_normalized() -> None:
    settings = load(
        {
            "GATEWAY_UPSTREAM__SIGNED_HEADERS": "Host,Content-Type,host",
            "GATEWAY_LOG__LEVEL": "debug",
        }
    )
    assert settings.upstream.signed_headers == ("host", "content-type")
    assert settings.log.level == "DEBUG"


@pytest.mark.parametrize(
    ("url", "host_header", "expected"),
    [
        ("https://isales.example.com:28080/base", "", "isales.example.com:28080"),
        ("https://isales.example.com", "", "isales.example.com"),
        ("https://10.22.26.181:443", "", "10.22.26.181:443"),
        ("https://isales.example.com", "10.22.26.181:28080", "10.22.26.181:28080"),
    ],
)
def test_the_upstream_host_is_the_host_header_else_the_url_netloc_as_written(
    url: str, host_header: str, expected: str
) -> None:
    env = {"GATEWAY_UPSTREAM__URL": url, "GATEWAY_UPSTREAM__HOST_HEADER": host_header}
    assert load(env).upstream_host == expected


def test_a_redis_url_turns_off_embedded_mode() -> None:
    assert not load({"GATEWAY_REDIS__URL": "redis://redis:6379/0"}).embedded


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:hunter2@redis:6380", "rediss://default:***@redis:6380"),
        ("redis://hunter2@redis:6379", "redis://***@redis:6379"),
        ("redis://:hun@ter2@redis:6379", "redis://:***@redis:6379"),
        (
            "unix:///run/redis.sock?db=1&password=hunter2",
            "unix:///run/redis.sock?db=1&password=***",
        ),
        (
            "redis+sentinel://s1:26379,s2:26379/mymaster",
            "redis+sentinel://s1:26379,s2:26379/mymaster",
        ),
    ],
)
def test_redacted_hides_credentials_and_keeps_the_rest(url: str, shown: str) -> None:
    settings = load_settings(None, {**UPSTREAM, "GATEWAY_REDIS__URL": url})
    data = settings.redacted()
    assert data["redis"]["url"] == shown
    assert data["upstream"]["ak"] == data["upstream"]["sk"] == "***"
    assert data["upstream"]["signed_headers"] == ["host"]
    assert data["server"]["port"] == 8080
    text = json.dumps(data)
    for secret in ("hunter2", "ter2", "the-ak", "the-sk"):
        assert secret not in text
        assert secret not in repr(settings.upstream)


def test_the_example_file_names_every_setting_at_its_default() -> None:
    with EXAMPLE.open("rb") as file:
        example = tomllib.load(file)
    assert list(example) == [f.name for f in dataclasses.fields(Settings)]
    for name, cls in SECTIONS.items():
        fields = dataclasses.fields(cls)
        assert list(example[name]) == [f.name for f in fields], name
        defaults = cls()
        for f in fields:
            value = example[name][f.name]
            expected = getattr(defaults, f.name)
            assert (tuple(value) if isinstance(value, list) else value) == expected, f.name
            assert type(value) is type(expected) or isinstance(value, list), f.name
    assert load(path=EXAMPLE) == Settings()
    assert load_settings(EXAMPLE, UPSTREAM).upstream.url == UPSTREAM["GATEWAY_UPSTREAM__URL"]
