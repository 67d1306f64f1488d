"""Permissions: the ``[apps.X.rules.Model]`` tables of the server configuration file.

Each model's table holds a ``read`` and a ``write`` filter in the query language
(``docs/query-language.md``), where ``$user.id`` (and the other user fields: the built-in
:data:`USER_FIELDS` plus every name of the app's ``[apps.X.jwt] fields`` mapping) stand for
the connected user; ``true`` / ``false`` mean everything / nothing. Optional
``[[apps.X.rules.Model.roles]]`` entries, tried in order, replace them for the users their
``when`` condition (a query over the user's fields) matches::

    [apps.todo.rules.Task]
    read = "owner_id == $user.id OR shared == true"
    write = "owner_id == $user.id"

    [[apps.todo.rules.Task.roles]]
    name = "support"
    when = "id IN {'u-support-1', 'u-support-2'}"
    read = true
    write = false

A table named ``"*"`` applies to the models that have none of their own. Once an app has a
rules table, a model with no rule (and no ``"*"``) can be neither read nor written. An app
without rules (and development mode) lets everyone read and write everything.

:func:`parse_rules` checks the syntax when the file is loaded; :meth:`AppRules.for_user`
binds the filters to the app's schemas for one user, giving the :class:`Permissions` the
hub consults for every object it sends or accepts.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import query as q
from ..core.schema import FieldSchema, Kind, ModelSchema
from ..errors import ConfigurationError, QueryError

log = logging.getLogger("tidesync.server.rules")

#: The built-in user fields rules may use, as ``$user.<name>`` in filters and ``<name>`` in
#: ``when``: the user's id, the provider that created it (``anonymous``, ``email_password``,
#: ``jwt``, ``server_api_key``) and its email address (email/password accounts; JWT users
#: when the app maps an ``email`` claim). An app's JWT ``fields`` add their names.
USER_FIELDS: tuple[str, ...] = ("id", "provider", "email")


def user_field_names(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The user fields of an app: the built-in ones, then ``extra`` (its JWT field names)."""
    names = list(USER_FIELDS)
    for name in extra:
        if name not in names:
            names.append(name)
    return tuple(names)


def user_schema(names: Sequence[str] = USER_FIELDS) -> ModelSchema:
    """The pseudo-model ``User`` that ``when`` conditions are bound against: one optional
    string field per user field (``id`` is the primary key)."""
    return ModelSchema(
        "User",
        tuple(
            FieldSchema(n, Kind.STR, optional=(n != "id"), primary_key=(n == "id")) for n in names
        ),
        "id",
    )


#: The pseudo-model of the built-in user fields.
USER_SCHEMA = user_schema()
#: The name of the table that applies to models without one.
ANY_MODEL = "*"

_USER_REF = re.compile(r"\$user\.([A-Za-z_][A-Za-z0-9_]*)")
_RULE_KEYS = {"read", "write", "roles"}
_ROLE_KEYS = {"name", "when", "read", "write"}


def substitute_user(text: str, known: Sequence[str] = USER_FIELDS) -> tuple[str, list[str]]:
    """Replace each ``$user.<field>`` outside string literals with ``$<n>``; return the new
    text and the field names in argument order. Raises ``ValueError`` for a field not in
    ``known``."""
    out: list[str] = []
    names: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"":
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
            continue
        m = _USER_REF.match(text, i)
        if m is not None:
            name = m.group(1)
            if name not in known:
                raise ValueError(f"unknown user field $user.{name} (known: {', '.join(known)})")
            if name not in names:
                names.append(name)
            out.append(f"${names.index(name)}")
            i = m.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out), names


def _filter_text(value: Any, where: str, known: Sequence[str]) -> str:
    if value is True:
        return "TRUEPREDICATE"
    if value is False:
        return "FALSEPREDICATE"
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{where} must be a query string, true or false")
    try:
        text, _ = substitute_user(value, known)
        q.parse(text)
    except (ValueError, QueryError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
    return value


@dataclass(frozen=True, slots=True)
class Role:
    """One way of applying a model's rules: ``when`` (None: everyone) picks the users."""

    name: str
    when: str | None
    read: str
    write: str


@dataclass(frozen=True, slots=True)
class ModelRules:
    """A model's roles, tried in order; the last has ``when`` None."""

    model: str
    roles: tuple[Role, ...]

    def role_for(self, user: dict[str, Any], names: Sequence[str] = USER_FIELDS) -> Role | None:
        """The first role whose ``when`` matches ``user`` (None if none does)."""
        for role in self.roles:
            if role.when is None or _user_matches(role.when, user, names):
                return role
        return None


def _user_matches(when: str, user: dict[str, Any], names: Sequence[str]) -> bool:
    try:
        bound = q.bind(q.parse(when), user_schema(names), {}, ())
        return q.evaluate(bound, {f: user.get(f) for f in names}, lambda m, pk: None)
    except QueryError:
        log.exception("role condition %r cannot be evaluated", when)
        return False


@dataclass(frozen=True, slots=True)
class AppRules:
    """One app's rules: by model name (``"*"`` for the rest), and its user field names."""

    models: dict[str, ModelRules]
    user_fields: tuple[str, ...] = USER_FIELDS

    def rules_for(self, model: str) -> ModelRules | None:
        """The rules of ``model`` (its own table, else ``"*"``, else None: no access)."""
        return self.models.get(model) or self.models.get(ANY_MODEL)

    def for_user(self, user: dict[str, Any], schemas: dict[str, ModelSchema]) -> Permissions:
        """The permissions of ``user`` over the models of ``schemas``."""
        return Permissions(self, user, schemas)


def parse_rules(
    raw: dict[str, Any], where: str = "rules", jwt_fields: Iterable[str] = ()
) -> AppRules | None:
    """Check and parse an app's ``rules`` table (None when it is empty: no restrictions).
    ``jwt_fields``: the names of the app's JWT ``fields`` mapping (extra user fields).

    Raises :class:`~tidesync.errors.ConfigurationError` naming the key at fault."""
    if not raw:
        return None
    names = user_field_names(jwt_fields)
    schema = user_schema(names)
    models: dict[str, ModelRules] = {}
    for model, body in raw.items():
        here = f"{where}.{model}"
        if not isinstance(body, dict):
            raise ConfigurationError(f"[{here}] must be a table")
        unknown = sorted(set(body) - _RULE_KEYS)
        if unknown:
            raise ConfigurationError(f"unknown key(s) in [{here}]: {', '.join(unknown)}")
        roles: list[Role] = []
        raw_roles = body.get("roles", [])
        if not isinstance(raw_roles, list):
            raise ConfigurationError(f"{here}.roles must be an array of tables")
        for index, role in enumerate(raw_roles):
            rwhere = f"{here}.roles[{index}]"
            if not isinstance(role, dict):
                raise ConfigurationError(f"{rwhere} must be a table")
            unknown = sorted(set(role) - _ROLE_KEYS)
            if unknown:
                raise ConfigurationError(f"unknown key(s) in [{rwhere}]: {', '.join(unknown)}")
            when = role.get("when")
            if not isinstance(when, str) or not when.strip():
                raise ConfigurationError(f"{rwhere}.when must be a condition on the user")
            try:
                q.bind(q.parse(when), schema, {}, ())
            except QueryError as exc:
                raise ConfigurationError(f"{rwhere}.when: {exc}") from exc
            name = role.get("name", f"role{index}")
            if not isinstance(name, str):
                raise ConfigurationError(f"{rwhere}.name must be a string")
            roles.append(
                Role(
                    name,
                    when,
                    _filter_text(role.get("read", False), f"{rwhere}.read", names),
                    _filter_text(role.get("write", False), f"{rwhere}.write", names),
                )
            )
        roles.append(
            Role(
                "default",
                None,
                _filter_text(body.get("read", False), f"{here}.read", names),
                _filter_text(body.get("write", False), f"{here}.write", names),
            )
        )
        models[model] = ModelRules(model, tuple(roles))
    return AppRules(models, names)


class Permissions:
    """What one user may read and write: the rules bound to the app's schemas.

    A filter that does not fit the schema (unknown field, wrong type) denies and is logged:
    a broken rule must never widen access."""

    def __init__(
        self, rules: AppRules | None, user: dict[str, Any], schemas: dict[str, ModelSchema]
    ) -> None:
        self.rules = rules
        self.user = dict(user)
        self.schemas = schemas
        self._bound: dict[tuple[str, str], q.BoundQuery | None] = {}

    @property
    def unrestricted(self) -> bool:
        """True when every object may be read and written (no rules)."""
        return self.rules is None

    def _filter(self, model: str, kind: str) -> q.BoundQuery | None:
        key = (model, kind)
        if key in self._bound:
            return self._bound[key]
        bound: q.BoundQuery | None = None
        assert self.rules is not None
        rules = self.rules.rules_for(model)
        schema = self.schemas.get(model)
        known = self.rules.user_fields
        role = rules.role_for(self.user, known) if rules is not None else None
        if role is not None and schema is not None:
            text, names = substitute_user(role.read if kind == "read" else role.write, known)
            try:
                bound = q.bind(
                    q.parse(text), schema, self.schemas, [self.user.get(n) for n in names]
                )
            except QueryError:
                log.exception("the %s rule of %s does not fit its schema; denying", kind, model)
        self._bound[key] = bound
        return bound

    def _allows(self, model: str, kind: str, values: dict[str, Any]) -> bool:
        if self.rules is None:
            return True
        bound = self._filter(model, kind)
        return bound is not None and q.evaluate(bound, values, _no_links)

    def can_read(self, model: str, values: dict[str, Any]) -> bool:
        """May the user see an object with these (rendered) values?"""
        return self._allows(model, "read", values)

    def can_write(self, model: str, values: dict[str, Any]) -> bool:
        """May the user write an object with these values (checked before and after)?"""
        return self._allows(model, "write", values)

    def read_filter(self, model: str) -> tuple[bool, q.BoundQuery | None]:
        """``(readable at all, the read rule's bound filter or None for no filter)`` of
        ``model`` for this user (what ``storage.read_matching`` takes as its rule)."""
        if self.rules is None:
            return True, None
        bound = self._filter(model, "read")
        return bound is not None, bound

    def reads_anything(self, model: str) -> bool:
        """May the user read every object of ``model``, whatever its values (no rules, or
        a read rule that is always true for this user)?"""
        if self.rules is None:
            return True
        bound = self._filter(model, "read")
        return bound is not None and q.is_always_true(bound)

    def writes_anything(self, model: str) -> bool:
        """May the user write every object of ``model``, whatever its values (no rules, or
        a write rule that is always true for this user)?"""
        if self.rules is None:
            return True
        bound = self._filter(model, "write")
        return bound is not None and q.is_always_true(bound)


def _no_links(model: str, pk: Any) -> dict[str, Any] | None:
    """Rules see one object at a time: a link path reads as a missing object."""
    return None


def user_fields(user_id: str, extra: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """The user values rules see (``$user.id`` ...)."""
    out: dict[str, Any] = {"id": user_id}
    out.update(extra)
    return out


def user_values(user_id: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """The user values rules see, from the server's user record (``UserStore.user_data``:
    ``provider`` plus the provider's fields, e.g. ``email`` or the mapped JWT claims).

    Every value is a string or None: a JSON string stays as it is, ``true``/``false`` become
    ``"true"``/``"false"``, numbers their decimal text, lists and tables their compact JSON."""
    out: dict[str, Any] = {"id": user_id, "provider": None, "email": None}
    for name, value in (record or {}).items():
        if name == "id":
            continue  # the id is the server's, never a provider's claim
        out[name] = _as_text(value)
    return out


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
