"""The server's configuration file (``tidesync serve --config tidesync.toml``).

A configuration file turns on *production mode*: only the apps it declares exist, each with
the auth providers it lists. Without a file the server runs in *development mode*: any app
id, anonymous and email/password logins, accounts confirmed automatically. The file::

    [server]
    development_mode = false        # the default once a file is given
    access_token_ttl = 1800         # seconds
    refresh_token_ttl = 5184000
    max_frame_size = 16777216
    admin_keys = ["a-long-random-secret"]   # admin API + Credentials.api_key for scripts

    [limits]                        # see tidesync.server.limits.Limits
    login_attempts_per_account = 10

    [delivery]                      # how confirmation / reset tokens reach users
    command = ["/usr/local/bin/send-mail", "{kind}", "{email}"]   # token in $TIDESYNC_TOKEN
    # function = "mypackage.mail:deliver"   # called with a DeliveryMessage

    [apps.todo]
    auth = ["anonymous", "email_password", "api_key", "jwt"]
    auto_confirm = false

    [apps.todo.jwt]
    algorithm = "RS256"             # HS256 (secret = "...") or RS256 / EdDSA (public_key)
    public_key_file = "idp.pem"     # relative to the configuration file
    audience = "todo"
    issuer = "https://idp.example"
    user_id_claim = "sub"
    fields = { email = "email", name = "name" }

    [apps.todo.rules.Task]          # kept as a plain dict for the permissions engine
    read = true

    [[apps.todo.webhooks]]          # docs/backend.md, "Webhooks"
    url = "https://backend.example/hook"
    models = ["Task"]
    secret = "a-long-random-secret"
    query = "done == false"         # optional; timeout, max_failures, retry_initial,
                                    # retry_max, batch_size, start also optional

    [apps.todo.schema.Task]         # the declared schema (server/schemapin.py); or
    primary_key = "id"              # schema_file = "todo-schema.toml" in [apps.todo]
    fields = { id = "objectid", owner_id = "str", summary = "str", due = "datetime | None" }

Every key is checked: an unknown key or a wrong type is a :class:`ConfigurationError` that
names it, so a typo cannot silently weaken the configuration.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.schema import ModelSchema
from ..errors import ConfigurationError
from .limits import Limits

if TYPE_CHECKING:
    from .config import ServerConfig

ANONYMOUS, EMAIL_PASSWORD, API_KEY, JWT = "anonymous", "email_password", "api_key", "jwt"
PROVIDERS = (ANONYMOUS, EMAIL_PASSWORD, API_KEY, JWT)
JWT_ALGORITHMS = ("HS256", "RS256", "EdDSA")
#: Providers of an app in development mode.
DEV_PROVIDERS = (ANONYMOUS, EMAIL_PASSWORD, API_KEY)


#: The delivery kind sent when someone registers an address that has an account already
#: (no token: the mail tells the owner, while the HTTP answer is that of a new account).
REGISTERED_AGAIN = "registered_again"


@dataclass(frozen=True, slots=True)
class DeliveryMessage:
    """A message the server must get to a user: ``kind`` is "confirm" or "reset" (with a
    token), or :data:`REGISTERED_AGAIN` (``token`` empty)."""

    kind: str
    app_id: str
    email: str
    token: str


#: A Python delivery function (may be a coroutine function).
DeliveryFunction = Callable[[DeliveryMessage], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """How to verify tokens of an external identity provider and map their claims."""

    algorithm: str
    key: str  # the HS256 secret or the PEM public key
    audience: str | None = None
    issuer: str | None = None
    user_id_claim: str = "sub"
    fields: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algorithm not in JWT_ALGORITHMS:
            raise ConfigurationError(
                f"jwt.algorithm must be one of {', '.join(JWT_ALGORITHMS)}, not {self.algorithm!r}"
            )
        if not self.key:
            raise ConfigurationError("jwt needs a secret (HS256) or a public key (RS256/EdDSA)")


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """One ``[[apps.X.webhooks]]`` entry (docs/backend.md, "Webhooks"): where each batch of
    committed changes of ``models`` (matching ``query``) is POSTed, signed with ``secret``."""

    url: str
    models: tuple[str, ...]
    secret: str
    query: str | None = None
    #: Seconds one POST may take (connect, send, answer) before it counts as failed.
    timeout: float = 10.0
    #: Consecutive failed attempts after which the hook is paused (until resumed).
    max_failures: int = 10
    #: The first retry's delay (seconds); it doubles up to ``retry_max``.
    retry_initial: float = 1.0
    retry_max: float = 300.0
    #: Events per POST at most (a changeset's events are never split).
    batch_size: int = 500
    #: Where a new hook starts: "now" (changes committed after it is first started) or
    #: "beginning" (the oldest history kept).
    start: str = "now"


@dataclass(frozen=True, slots=True)
class AppSettings:
    """One declared app: its auth providers, JWT settings, (opaque) rules and schema."""

    app_id: str
    auth: tuple[str, ...] = DEV_PROVIDERS
    auto_confirm: bool = False
    jwt: JwtSettings | None = None
    rules: dict[str, Any] = field(default_factory=dict)
    #: The declared models by name (``server/schemapin.py``); None: learnt from clients.
    schema: dict[str, ModelSchema] | None = None
    #: The app's webhooks, in configuration order (their index names them).
    webhooks: tuple[WebhookSettings, ...] = ()

    def __post_init__(self) -> None:
        unknown = [p for p in self.auth if p not in PROVIDERS]
        if unknown:
            raise ConfigurationError(
                f"apps.{self.app_id}.auth: unknown provider(s) {', '.join(unknown)} "
                f"(known: {', '.join(PROVIDERS)})"
            )
        if JWT in self.auth and self.jwt is None:
            raise ConfigurationError(f"apps.{self.app_id}: 'jwt' is enabled but [jwt] is missing")

    def allows(self, provider: str) -> bool:
        """True if ``provider`` is enabled for this app."""
        return provider in self.auth


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Apps, admin keys and token delivery: everything auth needs to know."""

    apps: dict[str, AppSettings] = field(default_factory=dict)
    admin_keys: tuple[str, ...] = ()
    delivery_command: tuple[str, ...] = ()
    delivery_function: DeliveryFunction | None = None

    def app(self, app_id: str, development_mode: bool) -> AppSettings | None:
        """The settings of ``app_id``; in development mode unknown apps get the defaults."""
        declared = self.apps.get(app_id)
        if declared is not None or not development_mode:
            return declared
        return AppSettings(app_id, DEV_PROVIDERS, auto_confirm=True)


# -- the loader --------------------------------------------------------------------------------

_SERVER_KEYS: dict[str, type | tuple[type, ...]] = {
    "development_mode": bool,
    "access_token_ttl": (int, float),
    "refresh_token_ttl": (int, float),
    "max_frame_size": int,
    "download_page_bytes": int,
    "hello_timeout": (int, float),
    "token_purge_interval": (int, float),
    "key_reload_interval": (int, float),
    "request_head_timeout": (int, float),
    "trusted_proxies": list,
    "shutdown_grace": (int, float),
    "log_level": str,
    "admin_keys": list,
    "tls_cert": str,
    "tls_key": str,
    "storage_url": str,
}
_APP_KEYS = {"auth", "auto_confirm", "jwt", "rules", "schema", "schema_file", "webhooks"}
_WEBHOOK_KEYS = {
    "url",
    "models",
    "query",
    "secret",
    "timeout",
    "max_failures",
    "retry_initial",
    "retry_max",
    "batch_size",
    "start",
}
_JWT_KEYS = {
    "algorithm",
    "secret",
    "public_key",
    "public_key_file",
    "audience",
    "issuer",
    "user_id_claim",
    "fields",
}


def _table(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigurationError(f"[{where}] must be a table")
    return raw


def _reject_unknown(raw: dict[str, Any], known: set[str] | dict[str, Any], where: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigurationError(f"unknown key(s) in [{where}]: {', '.join(unknown)}")


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigurationError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _jwt(raw: dict[str, Any], where: str, base: Path) -> JwtSettings:
    _reject_unknown(raw, _JWT_KEYS, where)
    algorithm = raw.get("algorithm", "HS256")
    if algorithm not in JWT_ALGORITHMS:
        raise ConfigurationError(
            f"{where}.algorithm must be one of {', '.join(JWT_ALGORITHMS)}, not {algorithm!r}"
        )
    if algorithm == "HS256":
        key = raw.get("secret")
        if not isinstance(key, str) or len(key.encode()) < 32:
            raise ConfigurationError(f"{where}.secret must be a string of at least 32 bytes")
    else:
        key = raw.get("public_key")
        if "public_key_file" in raw:
            path = base / str(raw["public_key_file"])
            try:
                key = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(
                    f"{where}.public_key_file: cannot read {path}: {exc}"
                ) from exc
        if not isinstance(key, str) or "PUBLIC KEY" not in key:
            raise ConfigurationError(f"{where} needs a PEM public_key or public_key_file")
    fields = raw.get("fields", {})
    if not isinstance(fields, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
    ):
        raise ConfigurationError(f"{where}.fields must map field names to claim names")
    for name in ("audience", "issuer", "user_id_claim"):
        if name in raw and not isinstance(raw[name], str):
            raise ConfigurationError(f"{where}.{name} must be a string")
    return JwtSettings(
        algorithm=str(algorithm),
        key=key,
        audience=raw.get("audience"),
        issuer=raw.get("issuer"),
        user_id_claim=raw.get("user_id_claim", "sub"),
        fields=dict(fields),
    )


def _positive(raw: dict[str, Any], key: str, where: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{where}.{key} must be a positive number, not {value!r}")
    return float(value)


def _count(raw: dict[str, Any], key: str, where: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{where}.{key} must be a positive integer, not {value!r}")
    return value


def _webhook(raw: dict[str, Any], where: str) -> WebhookSettings:
    _reject_unknown(raw, _WEBHOOK_KEYS, where)
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"{where}.url must be an http:// or https:// URL, not {url!r}")
    if "models" not in raw:
        raise ConfigurationError(f"{where}.models is missing (the models whose changes it gets)")
    models = _str_list(raw["models"], f"{where}.models")
    if not models:
        raise ConfigurationError(f"{where}.models must name at least one model")
    secret = raw.get("secret")
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigurationError(f"{where}.secret must be a string of at least 16 characters")
    query = raw.get("query")
    if query is not None and (not isinstance(query, str) or not query.strip()):
        raise ConfigurationError(f"{where}.query must be a non-empty query string")
    start = raw.get("start", "now")
    if start not in ("now", "beginning"):
        raise ConfigurationError(f"{where}.start must be 'now' or 'beginning', not {start!r}")
    initial = _positive(raw, "retry_initial", where, 1.0)
    retry_max = _positive(raw, "retry_max", where, max(300.0, initial))
    if retry_max < initial:
        raise ConfigurationError(f"{where}.retry_max must not be below retry_initial")
    return WebhookSettings(
        url=url,
        models=models,
        secret=secret,
        query=query,
        timeout=_positive(raw, "timeout", where, 10.0),
        max_failures=_count(raw, "max_failures", where, 10),
        retry_initial=initial,
        retry_max=retry_max,
        batch_size=_count(raw, "batch_size", where, 500),
        start=str(start),
    )


def _check_query(hook: WebhookSettings, where: str, schema: dict[str, ModelSchema] | None) -> None:
    from ..core.query import bind, parse
    from ..errors import QueryError

    assert hook.query is not None
    schemas = schema or {}
    try:
        parsed = parse(hook.query)
        for model in hook.models if schemas else ():
            bind(parsed, schemas[model], schemas, ())
    except QueryError as exc:
        raise ConfigurationError(f"{where}.query: {exc}") from exc


def _webhooks(
    raw: Any, where: str, schema: dict[str, ModelSchema] | None
) -> tuple[WebhookSettings, ...]:
    if not isinstance(raw, list):
        raise ConfigurationError(f"{where} must be an array of tables ([[{where}]])")
    hooks: list[WebhookSettings] = []
    for index, body in enumerate(raw):
        here = f"{where}[{index}]"
        hook = _webhook(_table(body, here), here)
        unknown = sorted(set(hook.models) - set(schema)) if schema is not None else []
        if unknown:  # a typo would deliver nothing, silently
            raise ConfigurationError(
                f"{here}.models names model(s) the app's schema does not declare: "
                f"{', '.join(unknown)}"
            )
        if hook.query is not None:
            _check_query(hook, here, schema)
        hooks.append(hook)
    return tuple(hooks)


def _app(app_id: str, raw: dict[str, Any], base: Path) -> AppSettings:
    where = f"apps.{app_id}"
    _reject_unknown(raw, _APP_KEYS, where)
    auth = _str_list(raw.get("auth", [ANONYMOUS]), f"{where}.auth")
    auto_confirm = raw.get("auto_confirm", False)
    if not isinstance(auto_confirm, bool):
        raise ConfigurationError(f"{where}.auto_confirm must be true or false")
    jwt_raw = raw.get("jwt")
    jwt = _jwt(_table(jwt_raw, f"{where}.jwt"), f"{where}.jwt", base) if jwt_raw else None
    rules = _table(raw.get("rules", {}), f"{where}.rules")
    from .rules import parse_rules

    # checked now: a typo must not start a server (JWT field names are user fields too)
    parse_rules(rules, f"{where}.rules", jwt.fields if jwt is not None else ())
    from .schemapin import load_app_schema

    schema = load_app_schema(raw, where, base)
    undeclared = sorted(set(rules) - set(schema)) if schema is not None else []
    if undeclared:  # a typo in a rule's model would leave the real model unguarded
        raise ConfigurationError(
            f"[{where}.rules] names model(s) {where}.schema does not declare: "
            f"{', '.join(undeclared)}"
        )
    webhooks = _webhooks(raw.get("webhooks", []), f"{where}.webhooks", schema)
    return AppSettings(app_id, auth, auto_confirm, jwt, dict(rules), schema, webhooks)


def load_delivery_function(spec: str) -> DeliveryFunction:
    """Import ``module:attribute`` and return it (it must be callable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"delivery.function must look like 'module:function': {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"delivery.function {spec!r} cannot be imported: {exc}") from exc
    if not callable(target):
        raise ConfigurationError(f"delivery.function {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def parse_config(raw: dict[str, Any], base: Path, **overrides: Any) -> ServerConfig:
    """A :class:`ServerConfig` from a parsed TOML document (paths relative to ``base``)."""
    from .config import ServerConfig

    _reject_unknown(raw, {"server", "limits", "delivery", "apps"}, "top level")
    server = _table(raw.get("server", {}), "server")
    _reject_unknown(server, _SERVER_KEYS, "server")
    for key, kind in _SERVER_KEYS.items():
        value = server.get(key)
        if value is not None and (
            not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
        ):
            raise ConfigurationError(f"server.{key} has the wrong type: {value!r}")
    options: dict[str, Any] = {
        k: v
        for k, v in server.items()
        if k not in ("admin_keys", "tls_cert", "tls_key", "trusted_proxies")
    }
    if "trusted_proxies" in server:
        options["trusted_proxies"] = _str_list(server["trusted_proxies"], "server.trusted_proxies")
    options.setdefault("development_mode", False)
    for key in ("tls_cert", "tls_key"):
        if key in server:
            options[key] = str(base / server[key])
    admin_keys = _str_list(server.get("admin_keys", []), "server.admin_keys")
    if any(len(k) < 16 for k in admin_keys):
        raise ConfigurationError("server.admin_keys: every key needs at least 16 characters")
    limits = Limits.from_dict(_table(raw.get("limits", {}), "limits"))
    delivery = _table(raw.get("delivery", {}), "delivery")
    _reject_unknown(delivery, {"command", "function"}, "delivery")
    command = _str_list(delivery["command"], "delivery.command") if "command" in delivery else ()
    function = None
    if "function" in delivery:
        if not isinstance(delivery["function"], str):
            raise ConfigurationError("delivery.function must be a 'module:function' string")
        function = load_delivery_function(delivery["function"])
    apps_raw = _table(raw.get("apps", {}), "apps")
    apps = {
        app_id: _app(app_id, _table(body, f"apps.{app_id}"), base)
        for app_id, body in apps_raw.items()
    }
    auth = AuthSettings(apps, admin_keys, command, function)
    options.update(overrides)
    try:
        return ServerConfig(limits=limits, auth=auth, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid [server] settings: {exc}") from exc


def load_config(path: str | Path, **overrides: Any) -> ServerConfig:
    """Read a TOML configuration file into a :class:`ServerConfig` (production mode unless
    the file says ``development_mode = true``); ``overrides`` win over the file."""
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read the configuration file {file}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{file} is not valid TOML: {exc}") from exc
    return parse_config(raw, file.resolve().parent, **overrides)
