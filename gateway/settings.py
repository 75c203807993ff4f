"""The gateway's settings: one frozen object, loaded and validated once at start-up.

Sources, later wins: the dataclass defaults, an optional TOML file (one table per section),
then environment variables ``GATEWAY_<SECTION>__<KEY>``. Every problem is a ``ConfigError``
whose ``key`` is ``section.key``. Conversion and type checks are derived from the field
annotations, so adding a field needs no parser; the rules that go beyond types live in
``_validate``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from gateway.auth import load_callers
from gateway.errors import ConfigError
from gateway.otel import available as otel_available
from gateway.signing import TimestampFormat

ENV_PREFIX: Final = "GATEWAY_"
# The headers the gateway can send to the upstream byte for byte as it signed them.
SIGNABLE_HEADERS: Final = frozenset({"host", "content-type", "content-length"})
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS: Final = ("text", "json")
REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
DEFAULT_NAMESPACE: Final = "isales:v1"
# A namespace is the first part of every key and channel: no braces (it would become or
# break a Redis Cluster hash tag), no spaces, nothing a log line or redis-cli would mangle.
NAMESPACE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,63}")
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})
_SECRET_QUERY: Final = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)
_REQUIRED_UPSTREAM: Final = {
    "url": "the vendor's base URL, e.g. https://isales.example.com:28080",
    "ak": "set GATEWAY_UPSTREAM__AK or upstream.ak_file",
    "sk": "set GATEWAY_UPSTREAM__SK or upstream.sk_file",
}
_ABOVE_ZERO: Final = math.ulp(0.0)  # the least float above zero: "> 0" as an inclusive bound
# section.key -> inclusive (minimum, maximum) of the numeric settings.
_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    "server.port": (1, 65535),
    "server.max_body_bytes": (256, 1048576),
    "server.shutdown_timeout_s": (_ABOVE_ZERO, math.inf),
    "server.backlog": (1, 65535),
    "auth.reload_interval_s": (0, 3600),
    "upstream.connect_timeout_ms": (1, math.inf),
    "upstream.timeout_ms": (1, math.inf),
    "upstream.abandoned_hold_ms": (0, math.inf),
    "upstream.max_body_bytes": (1024, 1073741824),
    "redis.timeout_ms": (1, 60000),
    "redis.pool_size": (1, 10000),
    "redis.pool_timeout_ms": (1, 10000),
    "upstream.retries": (0, 10),
    "upstream.retry_base_ms": (1, 60000),
    "upstream.retry_max_ms": (1, 600000),
    "upstream.deadline_ms": (1, math.inf),
    "upstream.breaker_failures": (1, 1000),
    "upstream.breaker_open_ms": (1, math.inf),
    "upstream.pause_ms": (1000, 3600000),
    "upstream.pause_max_ms": (1000, 3600000),
    "cache.swr_s": (0, math.inf),
    "limit.max_concurrent": (1, math.inf),
    "limit.window_ms": (1, math.inf),
    "limit.margin_ms": (0, math.inf),
    "limit.grant_ahead_ms": (0, 100),
    "limit.max_queue": (0, math.inf),
    "limit.max_wait_ms": (0, math.inf),
    "limit.replicas": (1, math.inf),
    "limit.clock_skew_ms": (0, 60000),
    "cache.ttl_closed_s": (0, math.inf),
    "cache.ttl_open_s": (0, math.inf),
    "cache.stale_s": (0, math.inf),
    "cache.negative_ttl_s": (0, math.inf),
    "cache.max_entries": (1, math.inf),
    "cache.no_cache_min_age_s": (0, math.inf),
    "cache.refresh_min_hits": (1, math.inf),
    "cache.refresh_ahead_s": (0, math.inf),
    "cache.refresh_max_share": (0, 1),
    "cache.local_max_bytes": (0, 2**40),
}


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 8192
    shutdown_timeout_s: float = 15.0
    backlog: int = 1024
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str = ""
    # repr=False: a settings object that ends up in a log or a traceback must not carry secrets.
    ak: str = field(default="", repr=False)
    sk: str = field(default="", repr=False)
    ak_file: str = ""
    sk_file: str = ""
    connect_timeout_ms: int = 3000
    timeout_ms: int = 10000
    # A call the gateway gave up on (timeout, dropped connection) after sending it keeps its
    # permit this much longer: the vendor may still be working on it.
    abandoned_hold_ms: int = 10000
    # The largest answer read from the upstream (decompressed); a larger one is a 502.
    max_body_bytes: int = 8388608
    verify_tls: bool = True
    ca_file: str = ""
    allow_http: bool = False
    signed_headers: tuple[str, ...] = ("host",)
    timestamp_format: TimestampFormat = "seconds"
    host_header: str = ""
    locale: Literal["", "zh_CN", "en_US"] = ""
    retries: int = 2
    retry_base_ms: int = 200
    retry_max_ms: int = 2000
    deadline_ms: int = 60000
    breaker_failures: int = 5
    breaker_open_ms: int = 10000
    pause_ms: int = 5000
    pause_max_ms: int = 300000
    proxy: str = ""
    trust_env: bool = True


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = ""
    # Prefix of every key and pub/sub channel: two deployments on one Redis (pub/sub ignores
    # the DB number) share nothing, neither budget nor cache, unless their namespaces match.
    namespace: str = DEFAULT_NAMESPACE
    timeout_ms: int = 250
    pool_size: int = 64
    # The most a call waits for one of the pool's connections when all are in use.
    pool_timeout_ms: int = 1000


@dataclass(frozen=True, slots=True)
class AdminSettings:
    key_sha256: str = ""


@dataclass(frozen=True, slots=True)
class AuthSettings:
    enabled: bool = True
    callers_file: str = ""
    reload_interval_s: float = 2.0


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_concurrent: int = 10
    window_ms: int = 1000
    margin_ms: int = 100
    max_queue: int = 250
    max_wait_ms: int = 30000
    replicas: int = 1
    # The most the wall clocks of the replicas and of Redis may differ (an assumption).
    clock_skew_ms: int = 500
    caller_header: str = ""
    # A permit may be granted this long before the window's edge and held until it, so the
    # request's set-up is done by then (0: grant at the edge).
    grant_ahead_ms: int = 15


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = True
    ttl_closed_s: float = 86400.0
    ttl_open_s: float = 30.0
    stale_s: float = 3600.0
    negative_ttl_s: float = 0.0
    swr_s: float = 10.0
    max_entries: int = 10000
    no_cache_min_age_s: float = 1.0
    refresh_min_hits: int = 3
    refresh_ahead_s: float = 5.0
    refresh_max_share: float = 0.2
    local_max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class ValidationSettings:
    # Where the vendor's document is silent: forward the request unchanged, or refuse it here.
    undocumented: Literal["forward", "reject"] = "forward"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    otlp_endpoint: str = ""
    service_name: str = "isales-gateway"


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    limit: LimitSettings = field(default_factory=LimitSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    log: LogSettings = field(default_factory=LogSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)

    @property
    def embedded(self) -> bool:
        """True without Redis: in-memory cache and limiter, one instance only."""
        return not self.redis.url

    @property
    def upstream_host(self) -> str:
        """The Host the gateway sends and signs: ``host_header``, else the URL's ``host[:port]``."""
        return self.upstream.host_header or urlsplit(self.upstream.url).netloc

    def redacted(self) -> dict[str, dict[str, object]]:
        """Every setting as plain data for a start-up log line, secrets replaced by ``***``."""
        data: dict[str, dict[str, object]] = asdict(self)
        for section in data.values():
            for key, value in section.items():
                if isinstance(value, tuple):
                    section[key] = list(value)
        for secret in ("ak", "sk"):
            if data["upstream"][secret]:
                data["upstream"][secret] = "***"
        if self.redis.url:
            data["redis"]["url"] = _redact_url(self.redis.url)
        if self.upstream.proxy:
            data["upstream"]["proxy"] = _redact_url(self.upstream.proxy)
        return data


SECTIONS: Final[dict[str, type[Any]]] = get_type_hints(Settings)
# section -> field -> type, the one schema that conversion and unknown-key checks read.
_SCHEMA: Final = {name: get_type_hints(cls) for name, cls in SECTIONS.items()}


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream: bool = True,
) -> Settings:
    """Defaults, then the TOML file at ``path``, then ``GATEWAY_*`` variables; validated.

    ``require_upstream=False`` (the simulator, ``check-config`` of a partial file) allows an
    empty upstream URL and credentials. Raises ``ConfigError`` naming the offending key.
    """
    raw: dict[str, dict[str, object]] = {name: {} for name in _SCHEMA}
    problems: list[ConfigError] = []
    if path is not None:
        for section, table in _read_toml(path).items():
            try:
                _field_type(section, None, str(path))
                if not isinstance(table, dict):
                    raise ConfigError(section, f"must be a table ([{section}]) in {path}")
            except ConfigError as exc:
                problems.append(exc)
                continue
            for key, value in table.items():
                try:
                    _field_type(section, key, str(path))
                except ConfigError as exc:
                    problems.append(exc)
                    continue
                raw[section][key] = value
    env = os.environ if environ is None else environ
    for name in sorted(env):
        rest = name[len(ENV_PREFIX) :]
        if not name.startswith(ENV_PREFIX) or "__" not in rest:
            continue  # GATEWAY_-prefixed variables of another shape are not settings
        section, _, key = rest.lower().partition("__")
        try:
            hint = _field_type(section, key, f"environment variable {name}")
            raw[section][key] = _from_env(f"{section}.{key}", hint, env[name])
        except ConfigError as exc:
            problems.append(exc)
    sections = {}
    for name, cls in SECTIONS.items():
        values = {}
        for k, v in raw[name].items():
            try:
                values[k] = _check(f"{name}.{k}", _SCHEMA[name][k], v)
            except ConfigError as exc:
                problems.append(exc)
        sections[name] = cls(**values)
    try:
        settings = _normalize(Settings(**sections))
    except ConfigError as exc:
        problems.append(exc)
        settings = Settings(**sections)
    problems += _validate(settings, require_upstream=require_upstream)
    if problems:
        raise ConfigErrors(problems)
    return settings


class ConfigErrors(ConfigError):
    """Every problem of one configuration, reported at once; ``key`` is the first one's."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        super().__init__(problems[0].key, "")
        self.message = "; ".join(p.message for p in problems)
        self.args = (self.message,)


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None


def _field_type(section: str, key: str | None, source: str) -> Any:
    """The annotated type of ``section.key``; an unknown name is an error, never ignored."""
    if section not in _SCHEMA:
        name = section if key is None else f"{section}.{key}"
        raise ConfigError(name, f"unknown section in {source}; known: {', '.join(_SCHEMA)}")
    if key is None:
        return None
    if key not in _SCHEMA[section]:
        known = ", ".join(_SCHEMA[section])
        raise ConfigError(f"{section}.{key}", f"unknown key in {source}; known: {known}")
    return _SCHEMA[section][key]


def _from_env(key: str, hint: Any, text: str) -> object:
    """Turn an environment string into the value TOML would give; ``_check`` then applies."""
    try:
        if hint is bool:
            word = text.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ValueError
            return word in _TRUE
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        kind = {bool: "true/false/1/0/yes/no", int: "an integer", float: "a number"}[hint]
        raise ConfigError(key, f"expected {kind}, got {text!r}") from None
    if get_origin(hint) is tuple:
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _check(key: str, hint: Any, value: object) -> object:
    """``value`` as the field's type; a wrong type is an error (a bool is not an int)."""
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, allowed))}")
        return value
    if get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "expected a list of strings")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[hint]
        raise ConfigError(key, f"expected {kind}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, "must be a finite number")
    return value


def _normalize(settings: Settings) -> Settings:
    """Read the credential files and put case-insensitive values in their canonical case."""
    up = settings.upstream
    return replace(
        settings,
        upstream=replace(
            up,
            ak=_secret("ak", up.ak, up.ak_file),
            sk=_secret("sk", up.sk, up.sk_file),
            signed_headers=tuple(dict.fromkeys(h.strip().lower() for h in up.signed_headers)),
        ),
        log=replace(settings.log, level=settings.log.level.upper()),
    )


def _secret(name: str, value: str, file_name: str) -> str:
    """``value``, or the stripped content of ``file_name`` when that is set."""
    if not file_name:
        return value
    key = f"upstream.{name}_file"
    if value:
        raise ConfigError(key, f"set upstream.{name} or {key}, not both")
    try:
        secret = Path(file_name).read_text(encoding="utf-8").rstrip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {file_name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        # Only the reason: the exception text would quote bytes of the secret.
        raise ConfigError(key, f"{file_name} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(key, f"{file_name} is empty")
    return secret


def _validate(s: Settings, *, require_upstream: bool) -> list[ConfigError]:
    """The rules beyond types: every broken one, in order."""
    problems: list[ConfigError] = []
    for key, (low, high) in _BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(s, section), name)
        if not low <= value <= high:
            allowed = f">= {low}" if high == math.inf else f"{low}..{high}"
            allowed = "> 0" if low == _ABOVE_ZERO else allowed
            problems.append(ConfigError(key, f"must be {allowed}, got {value}"))
    up = s.upstream
    for name, how in _REQUIRED_UPSTREAM.items():
        if require_upstream and not getattr(up, name):
            problems.append(ConfigError(f"upstream.{name}", f"required: {how}"))
    if up.pause_ms > up.pause_max_ms:
        problems.append(ConfigError("upstream.pause_ms", "must be <= upstream.pause_max_ms"))
    if up.connect_timeout_ms > up.timeout_ms:
        problems.append(
            ConfigError("upstream.connect_timeout_ms", "must be <= upstream.timeout_ms")
        )
    if up.ca_file and not Path(up.ca_file).is_file():
        problems.append(ConfigError("upstream.ca_file", f"no such file: {up.ca_file}"))
    if not up.signed_headers or not set(up.signed_headers) <= SIGNABLE_HEADERS:
        allowed = ", ".join(sorted(SIGNABLE_HEADERS))
        problems.append(
            ConfigError("upstream.signed_headers", f"must be a non-empty subset of {allowed}")
        )
    if s.limit.grant_ahead_ms * 10 > s.limit.window_ms + s.limit.margin_ms:
        problems.append(
            ConfigError("limit.grant_ahead_ms", "must be <= (limit.window_ms + margin_ms) / 10")
        )
    if s.limit.replicas > s.limit.max_concurrent:
        problems.append(
            ConfigError(
                "limit.replicas",
                "must be <= limit.max_concurrent: each replica needs a share of at least one "
                "permit for when it cannot reach Redis",
            )
        )
    for proxy in s.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            problems.append(
                ConfigError("server.trusted_proxies", f"not an IP address or network: {proxy!r}")
            )
    if s.log.level not in LOG_LEVELS:
        problems.append(ConfigError("log.level", f"must be one of {', '.join(LOG_LEVELS)}"))
    if s.log.format not in LOG_FORMATS:
        problems.append(ConfigError("log.format", f"must be one of {', '.join(LOG_FORMATS)}"))
    if not NAMESPACE.fullmatch(s.redis.namespace) or s.redis.namespace.endswith(":"):
        problems.append(
            ConfigError(
                "redis.namespace",
                "must be 1 to 64 of A-Z a-z 0-9 : . _ - (starting with a letter or digit, "
                "not ending with ':'), e.g. isales:v1 or isales:staging",
            )
        )
    if s.redis.url.startswith("redis+cluster://"):
        try:
            cluster_nodes(s.redis.url)
        except ConfigError as exc:
            problems.append(exc)
    if s.redis.url and not s.redis.url.startswith(REDIS_SCHEMES):
        schemes = ", ".join(REDIS_SCHEMES)
        problems.append(
            ConfigError("redis.url", f"must start with one of {schemes} (or be empty: embedded)")
        )
    if s.auth.callers_file:
        try:
            load_callers(s.auth.callers_file)
        except ConfigError as exc:
            problems.append(exc)
    elif s.auth.enabled and require_upstream:
        problems.append(
            ConfigError(
                "auth.callers_file",
                "required while auth.enabled is true (the callers' key digests); "
                "set auth.enabled = false to run without caller authentication",
            )
        )
    if s.limit.caller_header and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", s.limit.caller_header):
        problems.append(ConfigError("limit.caller_header", "must be a header name (A-Z a-z 0-9 -)"))
    if s.limit.caller_header and not s.auth.callers_file:
        problems.append(
            ConfigError(
                "limit.caller_header", "needs auth.callers_file: the caller names it may carry"
            )
        )
    if s.admin.key_sha256 and not re.fullmatch(r"[0-9a-f]{64}", s.admin.key_sha256):
        problems.append(
            ConfigError("admin.key_sha256", "must be 64 lowercase hex digits (a SHA-256)")
        )
    if up.url:
        try:
            _validate_upstream_url(up)
        except ConfigError as exc:
            problems.append(exc)
    if s.tracing.otlp_endpoint and not otel_available():
        problems.append(
            ConfigError(
                "tracing.otlp_endpoint",
                "needs the otel extra: pip install 'isales-gateway[otel]'",
            )
        )
    if up.proxy and urlsplit(up.proxy).scheme not in ("http", "https"):
        problems.append(
            ConfigError("upstream.proxy", "must be an http(s) URL, e.g. http://proxy:3128")
        )
    return problems


def _validate_upstream_url(up: UpstreamSettings) -> None:
    try:
        parts = urlsplit(up.url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError("upstream.url", f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("upstream.url", "must be an http(s) URL with a host, e.g. https://host")
    if parts.query or parts.fragment or "?" in up.url or "#" in up.url:
        raise ConfigError(
            "upstream.url", "must not have a query or fragment (a path prefix is fine)"
        )
    if "@" in parts.netloc:
        # The netloc becomes the signed Host header and appears in logs; AK/SK authenticate.
        raise ConfigError("upstream.url", "must not contain credentials; use upstream.ak/sk")
    if parts.scheme == "http" and not up.allow_http:
        raise ConfigError(
            "upstream.url",
            "http sends signed requests in clear text; "
            "set upstream.allow_http = true only for the simulator",
        )


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The ``host:port`` list of a ``redis+cluster://`` URL (port 6379 when left out);
    ConfigError for a bad address or a /db (a cluster has database 0 only)."""
    parts = urlsplit(url)
    if parts.path.strip("/") or parts.query:
        raise ConfigError("redis.url", "redis+cluster:// takes nodes only: no /db, no options")
    nodes = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, colon, port = item.rpartition(":")
        if not colon:
            host, port = item, "6379"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("redis.url", f"bad cluster node address {item!r}")
        nodes.append((host, int(port)))
    return nodes


def _redact_url(url: str) -> str:
    """``url`` with any password (userinfo or query parameter) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    # rpartition: an unencoded "@" inside the password must not leave part of it visible.
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        # A lone userinfo may be a password (redis://secret@host), so it is hidden too.
        userinfo = f"{user}:***" if colon else "***"
    redacted = f"{scheme}{sep}{userinfo}{at}{hosts}{rest[len(netloc) :]}"
    return _SECRET_QUERY.sub(r"\1***", redacted)
