"""The query language: a subset of Realm Query Language (RQL), parsed, bound and evaluated.

Queries are written once and run in three places: the local store compiles them to SQL
(``store/sqlquery.py``), the server evaluates them on objects for subscriptions and
permissions, and both must agree. This module holds everything that does not depend on a
database: :func:`parse` (text to a syntax tree, with the offset of every token),
:func:`bind` (names resolved against the schema, arguments type-checked and substituted),
:func:`conjoin` (narrowing a query with another) and :func:`evaluate` (the reference
semantics, in pure Python). The string matching helpers used by both sides live here too,
so the SQL functions the store registers are these exact functions.

See ``docs/query-language.md`` for the language itself.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import QueryError
from ..objectid import ObjectId
from .packing import datetime_to_micros
from .schema import FieldSchema, Kind, ModelSchema

__all__ = [
    "Arg",
    "BoundPath",
    "BoundQuery",
    "Compare",
    "Comparison",
    "Hop",
    "Literal",
    "Logical",
    "Not",
    "Path",
    "Query",
    "SortSpec",
    "ValueList",
    "bind",
    "conjoin",
    "evaluate",
    "is_always_true",
    "like_match",
    "parse",
    "render",
    "string_op",
]

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)

# --------------------------------------------------------------------------------- lexer


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # ident num str arg op ( ) { } , . attr ci oid uuid ts eof
    text: str  # the token's value (decoded for strings)
    pos: int
    raw: str  # the exact source text


_SPACE = re.compile(r"\s+")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}[@T]\d{2}:\d{2}:\d{2}(?::\d+)?(?![\w.])")
_TSTAMP = re.compile(r"T(-?\d+):(-?\d+)(?![\w.])")
_NUMBER = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARG = re.compile(r"\$(\d+)")
_OPS = ("==", "!=", "<>", "<=", ">=", "&&", "||", "=", "<", ">", "!")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "0": "\0"}


def _err(message: str, text: str, pos: int) -> QueryError:
    return QueryError(message, query=text, position=pos)


def _lex_string(text: str, start: int) -> tuple[str, int]:
    quote_char = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == quote_char:
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= len(text):
                break
            nxt = text[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
            elif nxt == "u":
                digits = text[i + 2 : i + 6]
                if not re.fullmatch(r"[0-9A-Fa-f]{4}", digits):
                    raise _err("invalid \\u escape", text, i)
                out.append(chr(int(digits, 16)))
                i += 6
            elif nxt in "\\'\"/":
                out.append(nxt)
                i += 2
            else:
                raise _err(f"unknown escape \\{nxt}", text, i)
            continue
        out.append(ch)
        i += 1
    raise _err("unterminated string", text, start)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while True:
        m = _SPACE.match(text, i)
        if m:
            i = m.end()
        if i >= n:
            tokens.append(_Token("eof", "", n, ""))
            return tokens
        ch = text[i]
        if ch in "'\"":
            value, end = _lex_string(text, i)
            tokens.append(_Token("str", value, i, text[i:end]))
            i = end
            continue
        if ch == "$":
            m = _ARG.match(text, i)
            if not m:
                raise _err("expected an argument number after $", text, i)
            tokens.append(_Token("arg", m.group(1), i, m.group(0)))
            i = m.end()
            continue
        if ch == "[":
            if text[i : i + 3].lower() == "[c]":
                tokens.append(_Token("ci", "[c]", i, text[i : i + 3]))
                i += 3
                continue
            raise _err("unexpected '['; only the [c] modifier is supported", text, i)
        if ch == "@":
            m = _IDENT.match(text, i + 1)
            if not m:
                raise _err("expected @count, @size or @length", text, i)
            tokens.append(_Token("attr", "@" + m.group(0).lower(), i, text[i : m.end()]))
            i = m.end()
            continue
        if ch in "(){},.":
            tokens.append(_Token(ch, ch, i, ch))
            i += 1
            continue
        op = next((o for o in _OPS if text.startswith(o, i)), None)
        if op is not None:
            tokens.append(_Token("op", op, i, op))
            i += len(op)
            continue
        if ch.isdigit() or (ch == "-" and i + 1 < n and text[i + 1].isdigit()):
            m = _DATE.match(text, i)
            if m:
                tokens.append(_Token("ts", m.group(0), i, m.group(0)))
                i = m.end()
                continue
            m = _NUMBER.match(text, i)
            assert m is not None
            if m.end() < n and (text[m.end()].isalnum() or text[m.end()] == "_"):
                raise _err("invalid number", text, i)
            tokens.append(_Token("num", m.group(0), i, m.group(0)))
            i = m.end()
            continue
        m = _TSTAMP.match(text, i)
        if m:
            tokens.append(_Token("ts", m.group(0), i, m.group(0)))
            i = m.end()
            continue
        m = _IDENT.match(text, i)
        if m:
            word = m.group(0)
            j = m.end()
            while j < n and text[j].isspace():
                j += 1
            if word.lower() in ("oid", "uuid") and j < n and text[j] == "(":
                close = text.find(")", j)
                if close < 0:
                    raise _err(f"unterminated {word}(...)", text, i)
                kind = word.lower()
                tokens.append(_Token(kind, text[j + 1 : close].strip(), i, text[i : close + 1]))
                i = close + 1
                continue
            tokens.append(_Token("ident", word, i, word))
            i = m.end()
            continue
        raise _err(f"unexpected character {ch!r}", text, i)


# ------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True, slots=True)
class Path:
    """A field path as written: ``owner.name`` or ``tags.@count``, with each segment's offset."""

    segments: tuple[str, ...]
    positions: tuple[int, ...]

    @property
    def pos(self) -> int:
        """Offset of the first segment."""
        return self.positions[0]

    @property
    def dotted(self) -> str:
        """The path as text."""
        return ".".join(self.segments)


@dataclass(frozen=True, slots=True)
class Literal:
    """A literal value; ``lexeme`` is its exact source text (kept for decimals and rendering)."""

    value: Any
    lexeme: str
    pos: int


@dataclass(frozen=True, slots=True)
class Arg:
    """An argument reference ``$index``."""

    index: int
    pos: int


@dataclass(frozen=True, slots=True)
class ValueList:
    """``{a, b, ...}`` after IN or BETWEEN."""

    items: tuple[Literal | Arg, ...]
    pos: int


Operand = Path | Literal | Arg


@dataclass(frozen=True, slots=True)
class Comparison:
    """``[quantifier] left op[c] right``; ``op`` is canonical (``==``, ``beginswith``...)."""

    left: Operand
    op: str
    right: Operand | ValueList
    pos: int  # of the operator
    ci: bool = False
    quantifier: str | None = None  # any / all / none
    quantifier_pos: int = 0


@dataclass(frozen=True, slots=True)
class Logical:
    """``AND`` / ``OR`` of two or more terms, or a constant (``TRUEPREDICATE``) when empty."""

    op: str  # "and" | "or" | "true" | "false"
    terms: tuple[Predicate, ...]
    pos: int


@dataclass(frozen=True, slots=True)
class Not:
    """``NOT term``."""

    term: Predicate
    pos: int


Predicate = Comparison | Logical | Not


@dataclass(frozen=True, slots=True)
class SortSpec:
    """One ``SORT`` key."""

    path: Path
    ascending: bool


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: predicate plus trailing clauses, and the text it came from."""

    predicate: Predicate
    sort: tuple[SortSpec, ...] | None
    limit: int | None
    distinct: tuple[Path, ...] | None
    text: str


# -------------------------------------------------------------------------------- parser

_STRING_OPS = {"beginswith", "endswith", "contains", "like"}
_QUANTIFIERS = {"any": "any", "some": "any", "all": "all", "none": "none"}
_OP_CANON = {"=": "==", "==": "==", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">"}
_OP_CANON[">="] = ">="
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


#: How deeply parentheses and NOTs may nest in one query; deeper is a QueryError naming it.
MAX_QUERY_NESTING = 100


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0

    def nest(self, tok: _Token) -> None:
        """Enter one level of nesting (a parenthesis or a NOT); refuse past the limit."""
        self.depth += 1
        if self.depth > MAX_QUERY_NESTING:
            raise _err(
                f"the query nests parentheses and NOTs more than {MAX_QUERY_NESTING} deep",
                self.text,
                tok.pos,
            )

    @property
    def tok(self) -> _Token:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> _Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> _Token:
        t = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return t

    def error(self, message: str, tok: _Token | None = None) -> QueryError:
        t = tok or self.tok
        what = "end of query" if t.kind == "eof" else repr(t.raw)
        return _err(f"{message} (found {what})", self.text, t.pos)

    def is_word(self, *words: str, tok: _Token | None = None) -> bool:
        t = tok or self.tok
        return t.kind == "ident" and t.text.lower() in words

    def expect(self, kind: str, what: str) -> _Token:
        if self.tok.kind != kind:
            raise self.error(f"expected {what}")
        return self.next()

    def query(self) -> Query:
        if self.tok.kind == "eof":
            raise self.error("empty query")
        pred = self.or_()
        sort: tuple[SortSpec, ...] | None = None
        limit: int | None = None
        distinct: tuple[Path, ...] | None = None
        while self.tok.kind != "eof":
            t = self.tok
            if not (self.is_word("sort", "limit", "distinct") and self.peek().kind == "("):
                raise self.error("expected AND, OR, SORT, LIMIT, DISTINCT or the end")
            word = t.text.lower()
            self.next()
            self.next()
            if word == "sort":
                if sort is not None:
                    raise _err("SORT given twice", self.text, t.pos)
                sort = self.sort_keys()
            elif word == "limit":
                if limit is not None:
                    raise _err("LIMIT given twice", self.text, t.pos)
                n = self.expect("num", "a non-negative integer")
                if not n.text.isdigit():
                    raise _err("LIMIT needs a non-negative integer", self.text, n.pos)
                limit = int(n.text)
            else:
                if distinct is not None:
                    raise _err("DISTINCT given twice", self.text, t.pos)
                paths = [self.path()]
                while self.tok.kind == ",":
                    self.next()
                    paths.append(self.path())
                distinct = tuple(paths)
            self.expect(")", "')'")
        return Query(pred, sort, limit, distinct, self.text)

    def sort_keys(self) -> tuple[SortSpec, ...]:
        keys = []
        while True:
            p = self.path()
            asc = True
            if self.is_word("asc", "ascending"):
                self.next()
            elif self.is_word("desc", "descending"):
                self.next()
                asc = False
            else:
                raise self.error("expected ASC or DESC")
            keys.append(SortSpec(p, asc))
            if self.tok.kind != ",":
                return tuple(keys)
            self.next()

    def or_(self) -> Predicate:
        start = self.tok.pos
        terms = [self.and_()]
        while self.is_word("or") or (self.tok.kind == "op" and self.tok.text == "||"):
            self.next()
            terms.append(self.and_())
        return terms[0] if len(terms) == 1 else Logical("or", tuple(terms), start)

    def and_(self) -> Predicate:
        start = self.tok.pos
        terms = [self.not_()]
        while self.is_word("and") or (self.tok.kind == "op" and self.tok.text == "&&"):
            self.next()
            terms.append(self.not_())
        return terms[0] if len(terms) == 1 else Logical("and", tuple(terms), start)

    def not_(self) -> Predicate:
        t = self.tok
        if self.is_word("not") or (t.kind == "op" and t.text == "!"):
            self.nest(t)
            self.next()
            inner = self.not_()
            self.depth -= 1
            return Not(inner, t.pos)
        return self.atom()

    def atom(self) -> Predicate:
        t = self.tok
        if t.kind == "(":
            self.nest(t)
            self.next()
            inner = self.or_()
            self.expect(")", "')'")
            self.depth -= 1
            return inner
        if self.is_word("truepredicate"):
            self.next()
            return Logical("true", (), t.pos)
        if self.is_word("falsepredicate"):
            self.next()
            return Logical("false", (), t.pos)
        quantifier = None
        if t.kind == "ident" and t.text.lower() in _QUANTIFIERS and self.peek().kind == "ident":
            quantifier = _QUANTIFIERS[t.text.lower()]
            self.next()
        left = self.operand()
        op_tok = self.tok
        if op_tok.kind == "op" and op_tok.text in _OP_CANON:
            op = _OP_CANON[op_tok.text]
        elif op_tok.kind == "ident" and op_tok.text.lower() in (_STRING_OPS | {"in", "between"}):
            op = op_tok.text.lower()
        else:
            raise self.error("expected a comparison operator")
        self.next()
        ci = False
        if self.tok.kind == "ci":
            if op not in _STRING_OPS and op not in ("==", "!="):
                raise _err(f"[c] does not apply to {op_tok.raw}", self.text, self.tok.pos)
            ci = True
            self.next()
        right: Operand | ValueList
        if op == "between":
            right = self.value_list()
            if len(right.items) != 2:
                raise _err("BETWEEN needs exactly two values {low, high}", self.text, right.pos)
        elif op == "in" and self.tok.kind == "{":
            right = self.value_list()
        else:
            right = self.operand()
        return Comparison(left, op, right, op_tok.pos, ci, quantifier, t.pos)

    def value_list(self) -> ValueList:
        start = self.expect("{", "'{'")
        items: list[Literal | Arg] = []
        if self.tok.kind != "}":
            while True:
                v = self.operand()
                if isinstance(v, Path):
                    raise _err("expected a value, not a field", self.text, v.pos)
                items.append(v)
                if self.tok.kind != ",":
                    break
                self.next()
        self.expect("}", "',' or '}'")
        return ValueList(tuple(items), start.pos)

    def path(self) -> Path:
        t = self.expect("ident", "a field name")
        segs, poss = [t.text], [t.pos]
        while self.tok.kind == ".":
            if segs[-1].startswith("@"):
                raise self.error(f"nothing can follow {segs[-1]}")
            self.next()
            s = self.tok
            if s.kind not in ("ident", "attr"):
                raise self.error("expected a field name or @count after '.'")
            self.next()
            segs.append(s.text)
            poss.append(s.pos)
        return Path(tuple(segs), tuple(poss))

    def operand(self) -> Operand:
        t = self.tok
        if t.kind == "arg":
            self.next()
            return Arg(int(t.text), t.pos)
        if t.kind in ("str", "num", "oid", "uuid", "ts"):
            self.next()
            return Literal(self.literal_value(t), t.raw, t.pos)
        if t.kind == "ident":
            word = t.text.lower()
            if word in ("true", "false"):
                self.next()
                return Literal(word == "true", t.raw, t.pos)
            if word in ("null", "nil"):
                self.next()
                return Literal(None, t.raw, t.pos)
            return self.path()
        raise self.error("expected a field, a value or an argument")

    def literal_value(self, t: _Token) -> Any:
        try:
            if t.kind == "str":
                return t.text
            if t.kind == "num":
                if re.fullmatch(r"-?\d+", t.text):
                    return int(t.text)
                return float(t.text)
            if t.kind == "oid":
                return ObjectId(t.text)
            if t.kind == "uuid":
                if not re.fullmatch(r"[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}", t.text):
                    raise ValueError("not a canonical UUID")
                return uuid.UUID(t.text)
            return _timestamp(t.text)
        except (ValueError, OverflowError) as exc:
            raise _err(f"invalid literal {t.raw}: {exc}", self.text, t.pos) from exc


def _timestamp(text: str) -> _dt.datetime:
    m = _TSTAMP.fullmatch(text)
    if m:
        seconds, nanos = int(m.group(1)), int(m.group(2))
        if abs(nanos) > 999_999_999 or (seconds and nanos and (seconds < 0) != (nanos < 0)):
            raise ValueError("nanoseconds out of range or of the wrong sign")
        return _EPOCH + _dt.timedelta(seconds=seconds, microseconds=int(nanos / 1000))
    date, _, clock = text.replace("T", "@", 1).partition("@")
    parts = clock.split(":")
    nanos = int(parts[3]) if len(parts) == 4 else 0
    if nanos > 999_999_999:
        raise ValueError("nanoseconds out of range")
    y, mo, d = (int(x) for x in date.split("-"))
    h, mi, s = (int(x) for x in parts[:3])
    return _dt.datetime(y, mo, d, h, mi, s, nanos // 1000, tzinfo=_dt.UTC)


def parse(text: str) -> Query:
    """Parse a query (syntax only). Raises :class:`QueryError` with the offending offset."""
    return _Parser(text).query()


# ------------------------------------------------------------------ rendering, conjoin


def _render_operand(o: Operand | ValueList, arg_offset: int) -> str:
    if isinstance(o, Path):
        return o.dotted
    if isinstance(o, Literal):
        return o.lexeme
    if isinstance(o, Arg):
        return f"${o.index + arg_offset}"
    return "{" + ", ".join(_render_operand(i, arg_offset) for i in o.items) + "}"


def _render_pred(p: Predicate, arg_offset: int) -> str:
    if isinstance(p, Not):
        return f"NOT ({_render_pred(p.term, arg_offset)})"
    if isinstance(p, Logical):
        if p.op in ("true", "false"):
            return "TRUEPREDICATE" if p.op == "true" else "FALSEPREDICATE"
        joiner = " AND " if p.op == "and" else " OR "
        return joiner.join(f"({_render_pred(t, arg_offset)})" for t in p.terms)
    op = p.op.upper() if p.op.isalpha() else p.op
    quant = f"{p.quantifier.upper()} " if p.quantifier else ""
    ci = "[c]" if p.ci else ""
    left = _render_operand(p.left, arg_offset)
    return f"{quant}{left} {op}{ci} {_render_operand(p.right, arg_offset)}"


def render(query: Query, arg_offset: int = 0) -> str:
    """Canonical text of a query (``$n`` shifted by ``arg_offset``); ``parse`` reads it back."""
    out = _render_pred(query.predicate, arg_offset)
    if query.sort is not None:
        keys = ", ".join(f"{k.path.dotted} {'ASC' if k.ascending else 'DESC'}" for k in query.sort)
        out += f" SORT({keys})"
    if query.distinct is not None:
        out += f" DISTINCT({', '.join(p.dotted for p in query.distinct)})"
    if query.limit is not None:
        out += f" LIMIT({query.limit})"
    return out


def _max_arg(p: Predicate) -> int:
    if isinstance(p, Not):
        return _max_arg(p.term)
    if isinstance(p, Logical):
        return max((_max_arg(t) for t in p.terms), default=-1)
    best = -1
    for o in (p.left, p.right):
        items = o.items if isinstance(o, ValueList) else (o,)
        best = max([best, *(i.index for i in items if isinstance(i, Arg))])
    return best


def conjoin(a: Query, b: Query, arg_offset: int | None = None) -> Query:
    """``a AND b``; b's SORT / LIMIT / DISTINCT replace a's when b has them.

    b's arguments are renumbered by ``arg_offset`` (default: one past the highest ``$n``
    of a), so bind the result with ``[*args_a, *args_b]`` (pass ``len(args_a)`` when a
    was given more arguments than it refers to). The result's text is the canonical
    rendering of the combination, and positions in errors refer to it.
    """
    offset = _max_arg(a.predicate) + 1 if arg_offset is None else arg_offset
    pa = _render_pred(a.predicate, 0)
    pb = _render_pred(b.predicate, offset)
    merged = Query(
        Logical("true", (), 0),
        b.sort if b.sort is not None else a.sort,
        b.limit if b.limit is not None else a.limit,
        b.distinct if b.distinct is not None else a.distinct,
        "",
    )
    clauses = render(merged)[len("TRUEPREDICATE") :]
    return parse(f"({pa}) AND ({pb}){clauses}")


# ------------------------------------------------------------------------- bound tree


@dataclass(frozen=True, slots=True)
class Hop:
    """One step through a link field: to-one (``many=False``) or a collection of links."""

    field: str
    target: str
    many: bool


@dataclass(frozen=True, slots=True)
class BoundPath:
    """A resolved path: hops through links, then a terminal field of ``model``.

    ``attr`` is ``"count"`` (collection size) or ``"size"`` (string/bytes length) or None.
    ``kind`` is the kind the compared values have (a link's target pk kind; INT for attrs).
    """

    hops: tuple[Hop, ...]
    model: str
    field: FieldSchema
    attr: str | None
    kind: Kind
    text: str

    @property
    def elements(self) -> bool:
        """True when the path ends on a collection's elements (dict: its values)."""
        return self.field.is_collection and self.attr is None

    @property
    def multi(self) -> bool:
        """True when the path yields many values (needs ANY/ALL/NONE, ANY by default)."""
        return self.elements or any(h.many for h in self.hops)


@dataclass(frozen=True, slots=True)
class Compare:
    """A bound comparison; ``values`` are Python values already checked against ``path.kind``.

    ``op`` is one of ``== != < <= > >= between in beginswith endswith contains like``;
    ``quantifier`` is ``any``/``all``/``none`` (``any`` for single-valued paths).
    """

    path: BoundPath
    op: str
    values: tuple[Any, ...]
    quantifier: str = "any"
    ci: bool = False


@dataclass(frozen=True, slots=True)
class BoolOp:
    """``and`` / ``or`` of terms; ``true`` / ``false`` constants have no terms."""

    op: str
    terms: tuple[BoundPredicate, ...]


@dataclass(frozen=True, slots=True)
class BoundNot:
    """Negation."""

    term: BoundPredicate


BoundPredicate = Compare | BoolOp | BoundNot


@dataclass(frozen=True, slots=True)
class BoundQuery:
    """A query checked against a model: what the store compiles and the server evaluates.

    ``sort`` is ``((dotted path, ascending), ...)``; ``sort_paths`` and ``distinct_paths``
    are the same paths resolved.
    """

    model: str
    predicate: BoundPredicate
    sort: tuple[tuple[str, bool], ...]
    limit: int | None
    distinct: tuple[str, ...]
    text: str
    sort_paths: tuple[BoundPath, ...] = ()
    distinct_paths: tuple[BoundPath, ...] = ()


# ---------------------------------------------------------------------------- binding

_ORDERED = {"<", "<=", ">", ">=", "between"}
_NUMERIC = (Kind.INT, Kind.FLOAT, Kind.COUNTER, Kind.DECIMAL)


#: Converts an argument to the Python value a path compares with (see :func:`bind`).
ArgConverter = Callable[["BoundPath", Any], Any]


class _Binder:
    def __init__(
        self,
        query: Query,
        schemas: dict[str, ModelSchema],
        args: Sequence[Any],
        convert: ArgConverter | None = None,
    ):
        self.text = query.text
        self.schemas = schemas
        self.args = args
        self.convert = convert

    def converted(self, o: Literal | Arg, path: BoundPath, raw: Any) -> Any:
        """An argument as ``convert`` makes it for ``path`` (a ``ValueError`` of it is a
        :class:`QueryError` at the argument); a literal as it is."""
        if self.convert is None or not isinstance(o, Arg) or raw is None:
            return raw
        try:
            return self.convert(path, raw)
        except ValueError as exc:
            raise self.err(f"argument ${o.index}: {exc}", o.pos) from None

    def err(self, message: str, pos: int) -> QueryError:
        return _err(message, self.text, pos)

    def path(self, model: ModelSchema, p: Path) -> BoundPath:
        hops: list[Hop] = []
        segs = p.segments
        i = 0
        while True:
            name, pos = segs[i], p.positions[i]
            if name.startswith("@"):
                raise self.err(f"{name} must follow a field", pos)
            f = model.by_name.get(name)
            if f is None:
                raise self.err(f"model {model.name} has no field {name!r}", pos)
            if i + 1 == len(segs):
                return self.terminal(model, f, None, hops, p)
            nxt, nxt_pos = segs[i + 1], p.positions[i + 1]
            if nxt.startswith("@"):
                return self.terminal(model, f, (nxt, nxt_pos), hops, p)
            if f.kind is not Kind.LINK or f.target is None:
                raise self.err(f"{model.name}.{name} is not a link; cannot follow '.'", nxt_pos)
            if f.target not in self.schemas:
                raise self.err(f"unknown model {f.target!r}", pos)
            hops.append(Hop(name, f.target, f.is_collection))
            model = self.schemas[f.target]
            i += 1

    def terminal(
        self,
        model: ModelSchema,
        f: FieldSchema,
        attr: tuple[str, int] | None,
        hops: list[Hop],
        p: Path,
    ) -> BoundPath:
        if attr is None:
            if f.kind is Kind.LINK:
                assert f.target is not None
                if f.target not in self.schemas:
                    raise self.err(f"unknown model {f.target!r}", p.positions[-1])
                kind = self.schemas[f.target].pk_field.kind
            else:
                kind = f.kind
            return BoundPath(tuple(hops), model.name, f, None, kind, p.dotted)
        name, pos = attr
        if name in ("@count", "@size") and f.is_collection:
            return BoundPath(tuple(hops), model.name, f, "count", Kind.INT, p.dotted)
        if name in ("@size", "@length") and not f.is_collection:
            if f.kind in (Kind.STR, Kind.BYTES):
                return BoundPath(tuple(hops), model.name, f, "size", Kind.INT, p.dotted)
        if name not in ("@count", "@size", "@length"):
            raise self.err(f"unknown attribute {name}", pos)
        raise self.err(f"{name} does not apply to {f.name} ({f.type_name()})", pos)

    def value(self, o: Literal | Arg, path: BoundPath, op: str) -> Any:
        raw, lexeme = self.raw(o)
        return self.coerce(self.converted(o, path, raw), lexeme, path, op, o.pos)

    def raw(self, o: Literal | Arg) -> tuple[Any, str | None]:
        if isinstance(o, Literal):
            return o.value, o.lexeme
        if o.index >= len(self.args):
            raise self.err(f"argument ${o.index} is missing ({len(self.args)} given)", o.pos)
        return self.args[o.index], None

    def coerce(self, v: Any, lexeme: str | None, path: BoundPath, op: str, pos: int) -> Any:
        kind = path.kind
        if v is None:
            if op in _ORDERED:
                raise self.err(f"cannot compare with null using {op}", pos)
            if op in _STRING_OPS:
                raise self.err(f"{op.upper()} needs a string, not null", pos)
            return None
        ok = False
        if kind is Kind.BOOL:
            ok = isinstance(v, bool)
        elif kind in _NUMERIC and isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and math.isnan(v):
                raise self.err("NaN cannot be compared", pos)
            if kind is Kind.DECIMAL:
                return Decimal(lexeme) if lexeme is not None else Decimal(repr(v))
            return v
        elif kind is Kind.DECIMAL and isinstance(v, Decimal):
            if v.is_nan():
                raise self.err("NaN cannot be compared", pos)
            return v
        elif kind is Kind.STR:
            ok = isinstance(v, str)
        elif kind is Kind.BYTES and isinstance(v, (bytes, bytearray, memoryview)):
            return bytes(v)
        elif kind is Kind.DATETIME:
            ok = isinstance(v, _dt.datetime)
        elif kind is Kind.UUID:
            ok = isinstance(v, uuid.UUID)
        elif kind is Kind.OBJECTID:
            ok = isinstance(v, ObjectId)
        if not ok:
            raise self.err(
                f"{path.text} ({path.field.type_name() if path.attr is None else 'int'}) "
                f"cannot be compared with {type(v).__name__} {v!r}",
                pos,
            )
        return v

    def predicate(self, model: ModelSchema, p: Predicate) -> BoundPredicate:
        if isinstance(p, Not):
            return BoundNot(self.predicate(model, p.term))
        if isinstance(p, Logical):
            return BoolOp(p.op, tuple(self.predicate(model, t) for t in p.terms))
        return self.comparison(model, p)

    def comparison(self, model: ModelSchema, c: Comparison) -> Compare:
        left, op, right, quantifier = c.left, c.op, c.right, c.quantifier
        if not isinstance(left, Path):
            if op == "in" and isinstance(right, Path):  # 'x' IN tags  ==  ANY tags == 'x'
                path = self.path(model, right)
                if not path.elements:
                    raise self.err(f"{path.text} is not a collection", right.pos)
                self.check_op(path, "==", False, c.pos)
                return Compare(path, "==", (self.value(left, path, "=="),), "any")
            if not isinstance(right, Path) or op not in _FLIP:
                raise self.err("the left side of this comparison must be a field", left.pos)
            left, right, op = right, left, _FLIP[op]
        elif isinstance(right, Path):
            raise self.err("comparing two fields is not supported", right.pos)
        path = self.path(model, left)
        if quantifier is not None and not path.multi:
            raise self.err(f"{quantifier.upper()} needs a collection path", c.quantifier_pos)
        self.check_op(path, op, c.ci, c.pos)
        if isinstance(right, ValueList):
            values = tuple(self.value(i, path, op) for i in right.items)
        elif op == "in":
            assert isinstance(right, (Literal, Arg))
            raw, _ = self.raw(right)
            if not isinstance(raw, (list, tuple, set, frozenset)):
                raise self.err("IN needs {values} or a list argument", right.pos)
            values = tuple(
                self.coerce(self.converted(right, path, v), None, path, op, right.pos) for v in raw
            )
        else:
            assert isinstance(right, (Literal, Arg))
            values = (self.value(right, path, op),)
        return Compare(path, op, values, quantifier or "any", c.ci)

    def check_op(self, path: BoundPath, op: str, ci: bool, pos: int) -> None:
        if path.field.kind is Kind.LINK and path.attr is None and op not in ("==", "!=", "in"):
            raise self.err(f"{op.upper()} does not apply to a link", pos)
        if (op in _STRING_OPS or ci) and path.kind is not Kind.STR:
            raise self.err(f"{op.upper()} needs a string field, {path.text} is not one", pos)

    def order_path(self, model: ModelSchema, p: Path, what: str) -> BoundPath:
        path = self.path(model, p)
        if path.multi or path.attr is not None:
            raise self.err(f"{what} needs a single-valued field", p.pos)
        return path


def bind(
    query: Query,
    model: ModelSchema,
    schemas: dict[str, ModelSchema],
    args: Sequence[Any],
    convert: ArgConverter | None = None,
) -> BoundQuery:
    """Resolve fields and kinds and substitute arguments; :class:`QueryError` on any mismatch.

    ``convert(path, value)``: turns each (non-null) argument into the value ``path``
    compares with before it is checked (the Data API's JSON arguments: a date-time string
    for a datetime field); a ``ValueError`` it raises is a :class:`QueryError` at the
    argument."""
    all_schemas = dict(schemas)
    all_schemas.setdefault(model.name, model)
    b = _Binder(query, all_schemas, args, convert)
    pred = b.predicate(model, query.predicate)
    sort_paths = tuple(b.order_path(model, s.path, "SORT") for s in query.sort or ())
    distinct_paths = tuple(b.order_path(model, p, "DISTINCT") for p in query.distinct or ())
    return BoundQuery(
        model=model.name,
        predicate=pred,
        sort=tuple((s.path.dotted, s.ascending) for s in query.sort or ()),
        limit=query.limit,
        distinct=tuple(p.dotted for p in query.distinct or ()),
        text=query.text,
        sort_paths=sort_paths,
        distinct_paths=distinct_paths,
    )


# ------------------------------------------------------------------ string matching


@functools.lru_cache(maxsize=256)
def _like_regex(pattern: str) -> re.Pattern[str]:
    parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern]
    return re.compile("".join(parts), re.DOTALL)


def like_match(value: str, pattern: str) -> bool:
    """Realm LIKE: ``*`` matches any run of characters, ``?`` exactly one; whole string."""
    return _like_regex(pattern).fullmatch(value) is not None


def string_op(op: str, value: Any, pattern: Any, ci: bool) -> bool:
    """``value op pattern`` for ``eq beginswith endswith contains like``; False on null."""
    if not isinstance(value, str) or not isinstance(pattern, str):
        return False
    text: str = value.casefold() if ci else value
    pat: str = pattern.casefold() if ci else pattern
    if op == "eq":
        return text == pat
    if op == "beginswith":
        return text.startswith(pat)
    if op == "endswith":
        return text.endswith(pat)
    if op == "contains":
        return pat in text
    if op == "like":
        return like_match(text, pat)
    raise ValueError(f"unknown string operator {op!r}")


# -------------------------------------------------------------------------- evaluation

Lookup = Callable[[str, Any], "dict[str, Any] | None"]


def _norm(kind: Kind, v: Any) -> Any:
    """A value in the form comparisons use (same order and equality as the SQL encoding)."""
    if v is None:
        return None
    if kind is Kind.FLOAT:
        v = float(v)
        return None if math.isnan(v) else v
    if kind is Kind.DATETIME:
        return datetime_to_micros(v)
    if kind is Kind.DECIMAL:
        return Decimal(v)
    if kind is Kind.BYTES:
        return bytes(v)
    return v


def _items(coll: Any) -> Iterator[Any]:
    if coll is None:
        return iter(())
    if isinstance(coll, dict):
        return iter(coll.values())
    return iter(coll)


def _terminal(path: BoundPath, obj: dict[str, Any]) -> Any:
    v = obj.get(path.field.name)
    if path.attr == "count":
        return len(v) if v is not None else 0
    if path.attr == "size":
        return len(v) if v is not None else None
    return _norm(path.kind, v)


def _single(path: BoundPath, values: dict[str, Any], lookup: Lookup) -> Any:
    obj: dict[str, Any] | None = values
    for hop in path.hops:
        assert obj is not None
        pk = obj.get(hop.field)
        obj = lookup(hop.target, pk) if pk is not None else None
        if obj is None:
            return None
    assert obj is not None
    return _terminal(path, obj)


def _many(path: BoundPath, obj: dict[str, Any], lookup: Lookup, depth: int = 0) -> Iterator[Any]:
    if depth == len(path.hops):
        if path.elements:
            for item in _items(obj.get(path.field.name)):
                yield _norm(path.kind, item)
        else:
            yield _terminal(path, obj)
        return
    hop = path.hops[depth]
    pks = _items(obj.get(hop.field)) if hop.many else iter((obj.get(hop.field),))
    for pk in pks:
        target = lookup(hop.target, pk) if pk is not None else None
        if target is not None:
            yield from _many(path, target, lookup, depth + 1)


def _eq(v: Any, a: Any) -> bool:
    if a is None or v is None:
        return v is None and a is None
    try:
        return bool(v == a)
    except InvalidOperation:
        return False


def _test(c: Compare, v: Any) -> bool:
    op, kind = c.op, c.path.kind
    args = [_norm(kind, a) for a in c.values]
    if op in _STRING_OPS:
        return string_op(op, v, args[0], c.ci)
    if c.ci:
        if args[0] is None:
            hit = v is None
        else:
            hit = string_op("eq", v, args[0], True)
        return hit if op == "==" else not hit
    if op == "==":
        return _eq(v, args[0])
    if op == "!=":
        return not _eq(v, args[0])
    if op == "in":
        return any(_eq(v, a) for a in args)
    if v is None:
        return False
    try:
        if op == "between":
            return bool(args[0] <= v <= args[1])
        if op == "<":
            return bool(v < args[0])
        if op == "<=":
            return bool(v <= args[0])
        if op == ">":
            return bool(v > args[0])
        return bool(v >= args[0])
    except InvalidOperation:
        return False


def _eval(p: BoundPredicate, values: dict[str, Any], lookup: Lookup) -> bool:
    if isinstance(p, BoundNot):
        return not _eval(p.term, values, lookup)
    if isinstance(p, BoolOp):
        if p.op == "and":
            return all(_eval(t, values, lookup) for t in p.terms)
        if p.op == "or":
            return any(_eval(t, values, lookup) for t in p.terms)
        return p.op == "true"
    if not p.path.multi:
        return _test(p, _single(p.path, values, lookup))
    found = (_test(p, v) for v in _many(p.path, values, lookup))
    if p.quantifier == "all":
        return all(found)
    hit = any(found)
    return not hit if p.quantifier == "none" else hit


def evaluate(
    bound: BoundQuery,
    values: dict[str, Any],
    lookup: Callable[[str, Any], dict[str, Any] | None],
) -> bool:
    """Does an object (its rendered field values) match? ``lookup(model, pk)`` follows links.

    Same semantics as the SQL the store runs: the reference implementation.
    """
    return _eval(bound.predicate, values, lookup)


def _always(p: BoundPredicate, value: bool) -> bool:
    """Does ``p`` evaluate to ``value`` on every object, by its shape alone?"""
    if isinstance(p, BoundNot):
        return _always(p.term, not value)
    if not isinstance(p, BoolOp):
        return False  # a comparison depends on the object
    if p.op in ("true", "false"):
        return (p.op == "true") is value
    # and: true when all terms are, false when one is; or: the other way round
    every = (p.op == "and") is value
    terms = (_always(t, value) for t in p.terms)
    return all(terms) if every else any(terms)


def is_always_true(bound: BoundQuery) -> bool:
    """True when ``bound`` matches every object whatever its values (``TRUEPREDICATE``,
    what ``db.all(Model)`` subscribes with, and constant combinations of it), so a caller
    may skip :func:`evaluate`. Conservative: False for any comparison, even one that
    happens to hold for every stored object."""
    return _always(bound.predicate, True)
