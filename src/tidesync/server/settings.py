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
class AppSettings:
    """One declared app: its auth providers, JWT settings, (opaque) rules and schema."""

    app_id: str
    auth: tuple[str, ...] = DEV_PROVIDERS
    auto_confirm: bool = False
    jwt: JwtSettings | None = None
    rules: dict[str, Any] = field(default_factory=dict)
    #: The declared models by name (``server/schemapin.py``); None: learnt from clients.
    schema: dict[str, ModelSchema] | None = None

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
_APP_KEYS = {"auth", "auto_confirm", "jwt", "rules", "schema", "schema_file"}
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
    return AppSettings(app_id, auth, auto_confirm, jwt, dict(rules), schema)


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
