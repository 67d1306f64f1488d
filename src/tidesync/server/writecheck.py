"""The write check of an upload (rules and subscriptions), and its repeat in the commit.

:func:`judge` decides, object by object, which instructions of an upload's changesets the
user's write rule and the session's subscriptions allow, against given stored states
(docs/flexible-sync.md, "Compensating writes"). It does no I/O, so the same verdict is
reached twice:

- before the commit, by :func:`~.flexsync.check_upload` on the states it read (the
  verdict the device is told about, and the changesets handed to the committer);
- inside the commit's transaction, by :class:`CommitRecheck`, which the storage calls once
  it has locked the app's versions (:class:`~.storage.base.CommitCheck`): when a touched
  object's state is no longer what the first check read (another process committed to it
  in between), the upload is judged again on the state the transaction sees, and what is
  now refused is dropped and reported too. So a check and its commit are one step for
  every process sharing the storage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.changeset import Changeset, Instruction, Op
from ..core.hlc import HLC
from ..core.merge import ObjectState, created_values
from ..core.schema import ModelSchema
from .rules import Permissions
from .storage.base import CommitCheck, ObjectKey, object_keys

if TYPE_CHECKING:
    from .flexsync import CheckedUpload, FlexView

T = TypeVar("T")


@dataclass
class Verdict:
    """What :func:`judge` decided about an upload."""

    #: The changesets to integrate (each keeps its version, without refused instructions).
    changesets: list[Changeset]
    #: ``(model, pk, reason)`` of each refused object.
    refused: list[tuple[str, Any, str]]
    #: The objects made from nothing by one CREATE alone, as
    #: :attr:`~.flexsync.CheckedUpload.created` keeps them.
    created: dict[ObjectKey, tuple[HLC, bool]]


def judge(
    view: FlexView,
    schemas: dict[str, ModelSchema],
    changesets: list[Changeset],
    keyed: list[list[ObjectKey]],
    stored: Mapping[ObjectKey, bytes],
    counted: tuple[dict[ObjectKey, Any], dict[ObjectKey, int]] | None = None,
) -> Verdict:
    """Judge ``changesets`` (``keyed``: each one's instructions' object keys) against the
    ``stored`` state bytes of the objects they touch (missing: never stored): each
    object's instructions in each changeset are tried on a copy of its state (as the
    earlier changesets left it) and dropped when :func:`refusal` says why; an object
    refused once is refused in the later changesets too. ``counted``: what
    :func:`count_keys` gives for them, when the caller has it already."""
    keys, seen = count_keys(changesets, keyed) if counted is None else counted
    refused: list[tuple[str, Any, str]] = []
    refused_keys: set[ObjectKey] = set()
    created: dict[ObjectKey, tuple[HLC, bool]] = {}
    states: dict[ObjectKey, ObjectState] = {}
    out: list[Changeset] = []
    for cs, cs_keys in zip(changesets, keyed):
        groups: dict[ObjectKey, list[Instruction]] = {}
        for key, ins in zip(cs_keys, cs.instructions):
            group = groups.get(key)
            if group is None:
                groups[key] = [ins]
            else:
                group.append(ins)
        allowed: set[ObjectKey] = set()
        for key, inss in groups.items():
            schema = schemas.get(key[0])
            if key in refused_keys or schema is None:
                continue  # unknown model: the storage's validation refuses the batch
            after = None
            if seen[key] == 1 and key not in stored and inss[0].op is Op.CREATE:
                after = created_or_none(created_values, schema, inss[0])
            if after is not None:  # a new object made by one CREATE: no state to build
                reason = refusal_of_new(view, schema.name, after)
                if reason is None:
                    allowed.add(key)
                    created[key] = (inss[0].hlc, view.visible(schema.name, after))
                else:
                    refused.append((key[0], keys[key], reason))
                    refused_keys.add(key)
                continue
            state = states.get(key)
            if state is None:
                data = stored.get(key)
                state = ObjectState.from_bytes(data) if data is not None else ObjectState()
                states[key] = state
            reason = refusal(view, schema, state, inss)
            if reason is None:
                allowed.add(key)
                for ins in inss:
                    state.apply(ins, schema)
            else:
                refused.append((key[0], keys[key], reason))
                refused_keys.add(key)
        if len(allowed) == len(groups):
            out.append(cs)
        else:
            kept = tuple(i for k, i in zip(cs_keys, cs.instructions) if k in allowed)
            out.append(Changeset(cs.origin, cs.version, kept))
    return Verdict(out, refused, created)


def count_keys(
    changesets: list[Changeset], keyed: list[list[ObjectKey]]
) -> tuple[dict[ObjectKey, Any], dict[ObjectKey, int]]:
    """Every object the changesets touch -> its primary key, and -> how many of their
    instructions touch it."""
    keys: dict[ObjectKey, Any] = {}
    seen: dict[ObjectKey, int] = {}
    for cs, cs_keys in zip(changesets, keyed):
        for key, ins in zip(cs_keys, cs.instructions):
            keys[key] = ins.pk
            seen[key] = seen.get(key, 0) + 1
    return keys, seen


class CommitRecheck(CommitCheck):
    """:func:`judge` again inside the commit (see the module's docstring).

    ``view``: the session's view as the first check saw it (its permissions and
    subscriptions); ``stored``: the state bytes that check read; ``first``: its verdict;
    ``upload``: the record the session reconciles once acknowledged, whose ``refused`` and
    ``created`` each recheck sets (again from the first verdict, so a transaction done
    twice reports what its last attempt decided)."""

    def __init__(
        self,
        view: FlexView,
        schemas: dict[str, ModelSchema],
        stored: Mapping[ObjectKey, bytes],
        first: Verdict,
        upload: CheckedUpload,
    ) -> None:
        self._view = view
        self._schemas = schemas
        self._stored = stored
        self._first = first
        self._upload = upload

    def recheck(
        self, changesets: list[Changeset], states: Mapping[ObjectKey, bytes]
    ) -> list[Changeset]:
        """``changesets`` as they stand on ``states`` (see :class:`CommitCheck`); O(1)
        for an upload of new objects, one comparison per touched stored object else."""
        first, upload, stored = self._first, self._upload, self._stored
        upload.refused, upload.created = first.refused, first.created
        if all(stored.get(key) == data for key, data in states.items()):
            return changesets  # the first check saw exactly this
        now = {**stored, **states}  # an object the transaction did not read is as it was
        keyed = [object_keys(cs.instructions) for cs in changesets]
        verdict = judge(self._view, self._schemas, changesets, keyed, now)
        upload.created = verdict.created
        if not verdict.refused:
            return changesets
        upload.refused = first.refused + verdict.refused
        return verdict.changesets


def created_or_none(
    how: Callable[[Instruction, ModelSchema], T | None], schema: ModelSchema, ins: Instruction
) -> T | None:
    """``how(ins, schema)`` (:func:`~tidesync.core.merge.created_state` or
    :func:`~tidesync.core.merge.created_values` of a new object after its CREATE ``ins``
    alone), or None when the general path must judge it (collection fields, a malformed
    value)."""
    try:
        return how(ins, schema)
    except (ValueError, TypeError, KeyError):
        return None  # the general path leaves malformed input to the storage's validation


def refusal_of_new(view: FlexView, model: str, after: dict[str, Any]) -> str | None:
    """:func:`refusal` for an object that did not exist, created by one CREATE giving
    ``after`` (the same rules: the write rule on the new values, then the subscriptions)."""
    if not view.perms.can_write(model, after):
        return "the write rule does not allow creating this object"
    if view.subs is not None and not view.in_subscriptions(model, after):
        return "the object is outside the session's subscriptions"
    return None


def refusal(
    view: FlexView, schema: ModelSchema, state: ObjectState, inss: list[Instruction]
) -> str | None:
    """Why a group of instructions on one object is refused (None: allowed)."""
    model = schema.name
    before = state.render(schema)
    trial = ObjectState.from_bytes(state.to_bytes())
    try:
        for ins in inss:
            trial.apply(ins, schema)
    except (ValueError, TypeError, KeyError):
        return None  # malformed: the storage's validation refuses the whole batch
    after = trial.render(schema)
    perms = view.perms
    if before is None and after is None:
        if perms.writes_anything(model) or trial.to_bytes() == state.to_bytes():
            return None  # nothing to guard, or a change that changes nothing
        return refusal_of_dead(perms, schema, state, inss)
    if before is not None and not perms.can_write(model, before):
        if not perms.can_read(model, before):
            return "the object is not readable by this user (write rule)"
        return "the write rule does not allow changing this object"
    if before is None and after is not None and any(i.op is Op.CREATE for i in inss):
        if not perms.can_write(model, after):
            return "the write rule does not allow creating this object"
    elif after is not None and not perms.can_write(model, after):
        return "the write rule does not allow the object's new values"
    probe = after if after is not None else before
    if probe is not None and view.subs is not None:
        inside = view.in_subscriptions(model, probe) or (
            before is not None and view.in_subscriptions(model, before)
        )
        if not inside:
            return "the object is outside the session's subscriptions"
    return None


def refusal_of_dead(
    perms: Permissions, schema: ModelSchema, state: ObjectState, inss: list[Instruction]
) -> str | None:
    """:func:`refusal` for a change that leaves a missing (or erased) object dead and
    alters its stored state: allowed only when its CREATE made the object alive on the way
    (then an ERASE) with values the write rule allows. An update or erase of an object that
    does not exist has no values to check, and stored, a SET would show through (an ERASE
    hide) a later CREATE of that primary key: it is refused."""
    step = ObjectState.from_bytes(state.to_bytes())
    alive = False
    for ins in inss:
        step.apply(ins, schema)
        values = step.render(schema)
        if values is not None:
            if not perms.can_write(schema.name, values):
                return "the write rule does not allow creating this object"
            alive = True
    if alive:
        return None
    return "the object does not exist (or is erased) and the change does not create it"
