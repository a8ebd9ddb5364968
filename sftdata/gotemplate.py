"""A small evaluator of Go's ``text/template`` — the subset Ollama ``TEMPLATE``s use — so that sftdata can check, without
a Go toolchain, that the Go template it writes into a Modelfile renders what the Jinja training template renders.

Written here because no maintained Python package evaluates Go templates (the PyPI bindings wrap Go through cgo and
need a Go toolchain at install time). Covered: text and ``{{ }}`` actions with ``{{-``/``-}}`` trimming and
comments; pipelines with ``|``; variables (``$``, ``$x := ...``, ``$x = ...``, ``range $i, $v := ...``); fields on maps
and structs (``.A.B``, ``$x.A``, ``(pipeline).A``); ``if``/``else if``/``else``, ``range`` (slices, maps in sorted key
order, integers) with ``else``, ``break`` and ``continue``; ``with``; ``define``/``template``; string, number, ``true``,
``false`` and ``nil`` literals; the builtins ``and or not eq ne lt le gt ge len index slice print printf`` (verbs
``%s %d %v %q %T``) and ``call`` (always an error here); plus the functions a caller passes (Ollama: ``json``,
``currentDate``...). Values: ``str``, ``bool``, ``int`` (Go ``int``), ``float`` (``float64``), ``None`` (nil), ``list``
(``[]interface {}``), ``dict`` (``map[string]interface {}``) and :class:`GoStruct`; a value with a ``go_string`` method
prints through it (Go's ``Stringer``). ``None`` is a nil ``interface{}`` (an action prints ``<no value>``); a nil slice
is an empty list. Anything else raises :class:`GoTemplateError` rather than guessing.

Validated against the expected renders of Ollama's own template tests (``fixtures/ollama/``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable


class GoTemplateError(Exception):
    """A parse or execution error (Go reports these too: Ollama answers the request with the error)."""


@dataclass
class GoStruct:
    """A Go struct value: ``fields`` in declaration order; ``type_name`` is what ``%T`` prints; ``json_tags`` maps a
    field to its JSON name (``",omitempty"`` suffix as in Go's tags; fields without a tag are marshalled under their
    own name); ``stringer`` is its ``String()`` method, if the type has one."""

    type_name: str
    fields: dict[str, Any]
    json_tags: dict[str, str] = field(default_factory=dict)
    stringer: Callable[[GoStruct], str] | None = None

    def go_string(self) -> str | None:
        return self.stringer(self) if self.stringer else None

    def go_json(self) -> str:
        parts = []
        for name, value in self.fields.items():
            tag = self.json_tags.get(name, name)
            key, _, option = tag.partition(",")
            if option == "omitempty" and (value is None or (not isinstance(value, GoStruct) and not truth(value))):
                continue
            parts.append(f"{json_string(key)}:{go_json(value)}")
        return "{" + ",".join(parts) + "}"


class Stringer:
    """Mixin for list/dict subclasses whose Go type has a ``String()`` method (printed through it)."""

    go_type = ""

    def go_string(self) -> str:  # pragma: no cover - subclasses define it
        raise NotImplementedError


class _Missing:
    """The zero value a missing map key gives under ``missingkey=zero`` (prints ``<no value>``)."""

    def __repr__(self) -> str:
        return "<no value>"


MISSING = _Missing()


# --------------------------------------------------------------------------------------------------------------
# Lexer and parser
# --------------------------------------------------------------------------------------------------------------

_TRIM_SPACE = " \t\r\n"
_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<comment>/\*.*?\*/)
  | (?P<declare>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\]|\\.)+')
  | (?P<number>[+-]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][+-]?\d+)?))
  | (?P<variable>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<dot>\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""", re.S | re.X)
_CHAIN = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}


@dataclass
class _Tok:
    kind: str
    text: str


def _lex_action(src: str, where: int) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    while i < len(src):
        m = _TOKEN.match(src, i)
        if not m:
            raise GoTemplateError(f"unexpected {src[i]!r} in action at offset {where + i}")
        kind = m.lastgroup
        text = m.group()
        i = m.end()
        if kind in ("ws", "comment"):
            continue
        if kind in ("field", "variable", "rparen") and i < len(src):
            chain = _CHAIN.match(src, i)  # $x.A.B and (pipeline).A
            if chain and kind != "field":
                toks.append(_Tok(kind, text))
                toks.append(_Tok("chain", chain.group()))
                i = chain.end()
                continue
        toks.append(_Tok(kind, text))
    return toks


def _split(source: str) -> list[tuple[str, Any]]:
    """Text and action items, with ``{{-``/``-}}`` trimming applied to the neighbouring text."""
    items: list[tuple[str, Any]] = []
    pos = 0
    trim_next = False
    while True:
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if trim_next:
            text = text.lstrip(_TRIM_SPACE)
        if start < 0:
            if text:
                items.append(("text", text))
            return items
        body_start = start + 2
        left_trim = source.startswith("-", body_start) and body_start + 1 < len(source) and \
            source[body_start + 1] in _TRIM_SPACE
        if left_trim:
            text = text.rstrip(_TRIM_SPACE)
            body_start += 2
        if text:
            items.append(("text", text))
        end = _find_close(source, body_start)
        if end < 0:
            raise GoTemplateError(f"unclosed action at offset {start}")
        body_end = end
        trim_next = end - 2 >= body_start and source[end - 1] == "-" and source[end - 2] in _TRIM_SPACE
        if trim_next:
            body_end = end - 2
        body = source[body_start:body_end].strip(_TRIM_SPACE)
        if not (body.startswith("/*") and body.endswith("*/")):
            items.append(("action", (_lex_action(body, body_start), start)))
        pos = end + 2


def _find_close(source: str, i: int) -> int:
    """The index of the ``}}`` closing the action that starts at ``i`` (quotes and comments skipped)."""
    n = len(source)
    while i < n:
        c = source[i]
        if source.startswith("}}", i):
            return i
        if c == '"' or c == "'":
            j = i + 1
            while j < n and source[j] != c:
                j += 2 if source[j] == "\\" else 1
            i = j + 1
        elif c == "`":
            i = source.index("`", i + 1) + 1
        elif source.startswith("/*", i):
            i = source.index("*/", i) + 2
        else:
            i += 1
    return -1


@dataclass
class _Pipe:
    declare: list[str]
    assign: bool
    commands: list[list[Any]]  # each command: operands (nodes)


@dataclass
class _Node:
    kind: str  # text | action | if | range | with | template | break | continue
    text: str = ""
    pipe: _Pipe | None = None
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] | None = None
    name: str = ""


class _Parser:
    def __init__(self, source: str):
        self.items = _split(source)
        self.i = 0
        self.defines: dict[str, list[_Node]] = {}

    def parse(self) -> list[_Node]:
        nodes, stop = self._list()
        if stop is not None:
            raise GoTemplateError(f"unexpected {{{{{stop[0]}}}}}")
        return nodes

    def _list(self) -> tuple[list[_Node], tuple[str, list[_Tok]] | None]:
        """Nodes up to an ``end`` or ``else`` (returned as the stop keyword and its remaining tokens)."""
        nodes: list[_Node] = []
        while self.i < len(self.items):
            kind, value = self.items[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(_Node("text", text=value))
                continue
            toks, offset = value
            if not toks:
                raise GoTemplateError(f"missing value for command at offset {offset}")
            head = toks[0]
            if head.kind == "ident" and head.text in _KEYWORDS:
                word = head.text
                rest = toks[1:]
                if word in ("end", "else"):
                    return nodes, (word, rest)
                if word in ("if", "range", "with"):
                    nodes.append(self._branch(word, rest))
                elif word == "define":
                    name = _string_literal(rest[0]) if rest else None
                    if name is None or len(rest) != 1:
                        raise GoTemplateError("define needs one quoted name")
                    body, stop = self._list()
                    if not stop or stop[0] != "end":
                        raise GoTemplateError(f"unterminated define {name!r}")
                    self.defines[name] = body
                elif word == "template":
                    name = _string_literal(rest[0]) if rest else None
                    if name is None:
                        raise GoTemplateError("template needs a quoted name")
                    pipe = self._pipe(rest[1:]) if len(rest) > 1 else None
                    nodes.append(_Node("template", name=name, pipe=pipe))
                elif word in ("break", "continue"):
                    nodes.append(_Node(word))
                else:
                    raise GoTemplateError(f"{{{{{word}}}}} is outside the supported subset")
                continue
            nodes.append(_Node("action", pipe=self._pipe(toks)))
        return nodes, None

    def _branch(self, word: str, toks: list[_Tok]) -> _Node:
        node = _Node(word, pipe=self._pipe(toks, allow_range_vars=word == "range"))
        node.body, stop = self._list()
        if stop is None:
            raise GoTemplateError(f"unexpected EOF in {word}")
        if stop[0] == "else":
            rest = stop[1]
            if rest and rest[0].kind == "ident" and rest[0].text in ("if", "with"):
                node.orelse = [self._branch(rest[0].text, rest[1:])]  # `else if` closes with the outer `end`
                return node
            node.orelse, stop = self._list()
            if stop is None or stop[0] != "end":
                raise GoTemplateError(f"expected end after else in {word}")
        return node

    def _pipe(self, toks: list[_Tok], allow_range_vars: bool = False) -> _Pipe:
        declare: list[str] = []
        assign = False
        if toks and toks[0].kind == "variable":
            j = 1
            names = [toks[0].text]
            if allow_range_vars and len(toks) > 2 and toks[1].kind == "comma" and toks[2].kind == "variable":
                names.append(toks[2].text)
                j = 3
            if j < len(toks) and toks[j].kind in ("declare", "assign"):
                assign = toks[j].kind == "assign"
                declare = names
                toks = toks[j + 1:]
        commands: list[list[Any]] = [[]]
        k = 0
        while k < len(toks):
            t = toks[k]
            if t.kind == "pipe":
                commands.append([])
                k += 1
                continue
            if t.kind == "lparen":
                depth, j = 1, k + 1
                while j < len(toks) and depth:
                    depth += {"lparen": 1, "rparen": -1}.get(toks[j].kind, 0)
                    j += 1
                if depth:
                    raise GoTemplateError("unclosed left paren")
                inner = self._pipe(toks[k + 1:j - 1])
                node: Any = ("pipe", inner)
                if j < len(toks) and toks[j].kind == "chain":
                    node = ("chain", node, toks[j].text[1:].split("."))
                    j += 1
                commands[-1].append(node)
                k = j
                continue
            commands[-1].append(self._operand(t, toks[k + 1] if k + 1 < len(toks) else None))
            k += 2 if (k + 1 < len(toks) and toks[k + 1].kind == "chain") else 1
        if any(not c for c in commands):
            raise GoTemplateError("missing command in pipeline")
        return _Pipe(declare, assign, commands)

    @staticmethod
    def _operand(t: _Tok, nxt: _Tok | None) -> Any:
        chained = nxt is not None and nxt.kind == "chain"
        if t.kind == "field":
            return ("field", t.text[1:].split("."))
        if t.kind == "dot":
            return ("dot",)
        if t.kind == "variable":
            node = ("var", t.text)
            return ("chain", node, nxt.text[1:].split(".")) if chained else node
        if t.kind in ("string", "raw", "char"):
            return ("lit", _string_literal(t))
        if t.kind == "number":
            text = t.text.replace("_", "")
            if re.fullmatch(r"[+-]?(0[xX][0-9a-fA-F]+|\d+)", text):
                return ("lit", int(text, 0))
            return ("lit", float(text))
        if t.kind == "ident":
            if t.text in ("true", "false"):
                return ("lit", t.text == "true")
            if t.text == "nil":
                return ("nil",)
            return ("func", t.text)
        raise GoTemplateError(f"unexpected {t.text!r} in operand")


def _string_literal(t: _Tok) -> str | None:
    if t.kind == "raw":
        return t.text[1:-1]
    if t.kind == "string":
        return _unquote(t.text[1:-1])
    if t.kind == "char":
        return _unquote(t.text[1:-1])
    return None


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b", "f": "\f",
            "v": "\v", "0": "\0"}


def _unquote(s: str) -> str:
    out = []
    i = 0
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = s[i + 1]
        if e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            out.append(chr(int(s[i + 2:i + 2 + width], 16)))
            i += 2 + width
        elif e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        else:
            raise GoTemplateError(f"unknown escape \\{e}")
    return "".join(out)


# --------------------------------------------------------------------------------------------------------------
# Values: Go's truth, comparison and printing rules
# --------------------------------------------------------------------------------------------------------------


def truth(v: Any) -> bool:
    """Go's ``if``: false, 0, nil and empty strings, slices and maps are false; structs are true."""
    if v is None or v is MISSING:
        return False
    if isinstance(v, GoStruct):
        return True
    if isinstance(v, (bool, int, float, str, list, dict)):
        return bool(v)
    raise GoTemplateError(f"cannot take the truth of {type(v).__name__}")


def go_type(v: Any) -> str:
    """What ``printf "%T"`` prints for a value."""
    if v is None or v is MISSING:
        return "<nil>"
    if isinstance(v, GoStruct):
        return v.type_name
    if isinstance(v, Stringer) or getattr(v, "go_type", None):
        return v.go_type
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "[]interface {}"
    if isinstance(v, dict):
        return "map[string]interface {}"
    raise GoTemplateError(f"no Go type for {type(v).__name__}")


def format_float(f: float, verb: str = "v") -> str:
    """Go's ``%v`` for a float64 (``strconv.FormatFloat(f, 'g', -1, 64)``)."""
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if math.isnan(f):
        return "NaN"
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    digits, exp = _shortest(f)
    if exp < -4 or exp >= 6:  # 'g' with the shortest precision decides on an exponent as for precision 6
        mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{'-' if f < 0 else ''}{mant}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return _positional(f, digits, exp)


def _shortest(f: float) -> tuple[str, int]:
    """The shortest round-trip digits of ``|f|`` and its decimal exponent (d.ddd × 10^exp)."""
    r = repr(abs(f))
    if "e" in r:
        m, _, ee = r.partition("e")
        digits = m.replace(".", "").lstrip("0")
        return digits.rstrip("0") or "0", int(ee) + (len(m.split(".")[0]) - 1)
    whole, _, frac = r.partition(".")
    frac = frac.rstrip("0")
    if whole != "0":
        digits = (whole + frac).rstrip("0")
        return digits, len(whole) - 1
    stripped = frac.lstrip("0")
    return stripped, -(len(frac) - len(stripped)) - 1


def _positional(f: float, digits: str, exp: int) -> str:
    sign = "-" if f < 0 else ""
    if exp >= 0:
        if len(digits) <= exp + 1:
            return sign + digits + "0" * (exp + 1 - len(digits))
        return sign + digits[:exp + 1] + "." + digits[exp + 1:]
    return sign + "0." + "0" * (-exp - 1) + digits


def json_float(f: float) -> str:
    """Go's ``encoding/json`` for a float64: positional, exponent only below 1e-6 or from 1e21 (``e-07`` → ``e-7``)."""
    if math.isinf(f) or math.isnan(f):
        raise GoTemplateError(f"json: unsupported value: {f}")
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    digits, exp = _shortest(f)
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{'-' if f < 0 else ''}{mant}e{'-' if exp < 0 else '+'}{abs(exp)}"
    return _positional(f, digits, exp)


def go_print(v: Any) -> str:
    """How an action prints a value (``fmt.Fprint``, through ``String()`` when the type has one)."""
    if v is MISSING or v is None:
        return "<no value>"  # a nil interface{} leaves a pipeline as an invalid value
    if hasattr(v, "go_string"):
        s = v.go_string()
        if s is not None:
            return s
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_float(v)
    if isinstance(v, list):
        return "[" + " ".join(_print_nested(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{_print_nested(v[k])}" for k in sorted(v)) + "]"
    if isinstance(v, GoStruct):
        return "{" + " ".join(_print_nested(x) for x in v.fields.values()) + "}"
    raise GoTemplateError(f"cannot print {type(v).__name__}")


def _print_nested(v: Any) -> str:
    return "<nil>" if v is None else go_print(v)


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
                 "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_JSON_SPECIAL = re.compile(r'["\\<>&\u2028\u2029\x00-\x1f]')


def json_string(s: str) -> str:
    """Go's ``encoding/json`` string: HTML-safe (``<``, ``>``, ``&`` as ``\\u003c``...), U+2028/9 escaped."""
    return '"' + _JSON_SPECIAL.sub(lambda m: _JSON_ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), s) + '"'


def go_json(v: Any) -> str:
    """``json.Marshal``: compact, map keys sorted, structs through their ``go_json`` method."""
    if hasattr(v, "go_json"):
        return v.go_json()
    if v is None or v is MISSING:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return json_float(v)
    if isinstance(v, str):
        return json_string(v)
    if isinstance(v, list):
        return "[" + ",".join(go_json(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{json_string(str(k))}:{go_json(v[k])}" for k in sorted(v)) + "}"
    raise GoTemplateError(f"json: cannot marshal {type(v).__name__}")


def _basic(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    return "other"


def _eq(a: Any, b: Any) -> bool:
    ka, kb = _basic(a), _basic(b)
    if ka == "other" or kb == "other":
        if a is None or b is None or a is MISSING or b is MISSING:
            return (a is None or a is MISSING) and (b is None or b is MISSING)
        raise GoTemplateError("incompatible types for comparison")
    if ka != kb:
        raise GoTemplateError(f"incompatible types for comparison: {ka} and {kb}")
    return a == b


def _less(a: Any, b: Any) -> bool:
    ka, kb = _basic(a), _basic(b)
    if ka != kb or ka in ("bool", "other"):
        raise GoTemplateError("incompatible types for comparison")
    return a < b


@lru_cache(maxsize=256)
def _utf8(s: str) -> bytes:
    return s.encode("utf-8")


def _length(v: Any) -> int:
    if isinstance(v, str):
        return len(_utf8(v))  # Go: bytes
    if isinstance(v, (list, dict)):
        return len(v)
    raise GoTemplateError(f"len of type {go_type(v)}")


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(v, str):
            b = _utf8(v)
            if not isinstance(k, int) or not 0 <= k < len(b):
                raise GoTemplateError(f"error calling index: index out of range: {k}")
            v = b[k]
        elif isinstance(v, list):
            if not isinstance(k, int) or not 0 <= k < len(v):
                raise GoTemplateError(f"error calling index: index out of range: {k}")
            v = v[k]
        elif isinstance(v, dict):
            v = v.get(k, None)
        else:
            raise GoTemplateError(f"can't index item of type {go_type(v)}")
    return v


def _slice(v: Any, *ix: Any) -> Any:
    if len(ix) > 2:
        raise GoTemplateError("slice: three-index slices are outside the supported subset")
    if isinstance(v, str):
        b = _utf8(v)
        lo = ix[0] if ix else 0
        hi = ix[1] if len(ix) > 1 else len(b)
        if not 0 <= lo <= hi <= len(b):
            raise GoTemplateError(f"error calling slice: index out of range: {lo}:{hi}")
        try:
            return b[lo:hi].decode("utf-8")
        except UnicodeDecodeError:
            raise GoTemplateError("slice: cuts a UTF-8 character (outside the supported subset)") from None
    if isinstance(v, list):
        lo = ix[0] if ix else 0
        hi = ix[1] if len(ix) > 1 else len(v)
        if not 0 <= lo <= hi <= len(v):
            raise GoTemplateError(f"error calling slice: index out of range: {lo}:{hi}")
        return v[lo:hi]
    raise GoTemplateError(f"can't slice item of type {go_type(v)}")


def _sprint(*args: Any) -> str:
    """``fmt.Sprint``: a space between operands when neither is a string."""
    out = []
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(go_print(a))
    return "".join(out)


def _sprintf(fmt: str, *args: Any) -> str:
    out = []
    it = iter(args)
    i = 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        verb = fmt[i + 1] if i + 1 < len(fmt) else ""
        i += 2
        if verb == "%":
            out.append("%")
            continue
        try:
            a = next(it)
        except StopIteration:
            out.append(f"%!{verb}(MISSING)")
            continue
        if verb in ("s", "v"):
            out.append(go_print(a))
        elif verb == "d" and isinstance(a, int) and not isinstance(a, bool):
            out.append(str(a))
        elif verb == "T":
            out.append(go_type(a))
        elif verb == "q" and isinstance(a, str):
            out.append(json_string(a).replace("\\u003c", "<").replace("\\u003e", ">").replace("\\u0026", "&"))
        else:
            raise GoTemplateError(f"printf verb %{verb} with {go_type(a)} is outside the supported subset")
    return "".join(out)


def _not_callable(fn: Any, *args: Any) -> Any:
    raise GoTemplateError(f"error calling call: non-function {go_print(fn)!r} of type {go_type(fn)}")


BUILTINS: dict[str, Callable[..., Any]] = {
    "not": lambda x: not truth(x), "len": _length, "index": _index, "slice": _slice,
    "eq": lambda a, *bs: any(_eq(a, b) for b in bs), "ne": lambda a, b: not _eq(a, b),
    "lt": _less, "le": lambda a, b: _less(a, b) or _eq(a, b), "gt": lambda a, b: _less(b, a),
    "ge": lambda a, b: _less(b, a) or _eq(a, b), "print": _sprint, "printf": _sprintf,
    "println": lambda *a: " ".join(go_print(x) for x in a) + "\n", "call": _not_callable,
}


# --------------------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------------------


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class GoTemplate:
    """A parsed template: ``GoTemplate(text, funcs).execute(data)`` returns the rendered string."""

    def __init__(self, source: str, funcs: dict[str, Callable[..., Any]] | None = None, max_steps: int = 5_000_000):
        self.source = source
        self.funcs = {**BUILTINS, **(funcs or {})}
        parser = _Parser(source)
        self.root = parser.parse()
        self.defines = parser.defines
        self.max_steps = max_steps
        self._check_names(self.root)
        for body in self.defines.values():
            self._check_names(body)

    def _check_names(self, nodes: list[_Node]) -> None:
        """Go refuses unknown functions and templates at parse time; so does this."""
        for n in nodes:
            if n.pipe is not None:
                for cmd in n.pipe.commands:
                    for op in cmd:
                        self._check_operand(op)
            if n.kind == "template" and n.name not in self.defines:
                raise GoTemplateError(f'no such template "{n.name}"')
            self._check_names(n.body)
            if n.orelse:
                self._check_names(n.orelse)

    def _check_operand(self, op: Any) -> None:
        if op[0] == "func" and op[1] not in self.funcs and op[1] not in ("and", "or"):
            raise GoTemplateError(f'function "{op[1]}" not defined')
        if op[0] == "pipe":
            for cmd in op[1].commands:
                for o in cmd:
                    self._check_operand(o)
        if op[0] == "chain":
            self._check_operand(op[1])

    def identifiers(self) -> set[str]:
        """Field and variable names the template mentions, as Ollama's ``Template.Vars`` collects them (lower-cased;
        a field chained onto a parenthesized pipeline is not seen, as in Ollama)."""
        names: set[str] = set()

        def operand(op: Any) -> None:
            if op[0] == "field":
                names.update(op[1])
            elif op[0] == "var":
                names.add(op[1])
            elif op[0] == "chain" and op[1][0] == "var":
                names.add(op[1][1])
                names.update(op[2])
            elif op[0] == "pipe":
                for cmd in op[1].commands:
                    for o in cmd:
                        operand(o)

        def walk(nodes: list[_Node]) -> None:
            for n in nodes:
                if n.pipe is not None:
                    names.update(n.pipe.declare)
                    for cmd in n.pipe.commands:
                        for o in cmd:
                            operand(o)
                walk(n.body)
                walk(n.orelse or [])

        walk(self.root)
        for body in self.defines.values():
            walk(body)
        return {n.lower() for n in names}

    def execute(self, data: Any) -> str:
        out: list[str] = []
        self._steps = 0
        self._walk(self.root, data, [("$", data)], out)
        return "".join(out)

    # -- statements ---------------------------------------------------------------------------------------------

    def _walk(self, nodes: list[_Node], dot: Any, scope: list[tuple[str, Any]], out: list[str]) -> None:
        for n in nodes:
            self._steps += 1
            if self._steps > self.max_steps:
                raise GoTemplateError("template execution exceeded its step budget")
            kind = n.kind
            if kind == "text":
                out.append(n.text)
            elif kind == "action":
                value = self._pipeline(n.pipe, dot, scope)
                if not n.pipe.declare:
                    out.append(go_print(value))
            elif kind in ("if", "with"):
                mark = len(scope)
                value = self._pipeline(n.pipe, dot, scope)
                if truth(value):
                    self._walk(n.body, value if kind == "with" else dot, scope, out)
                elif n.orelse is not None:
                    self._walk(n.orelse, dot, scope, out)
                del scope[mark:]
            elif kind == "range":
                self._range(n, dot, scope, out)
            elif kind == "template":
                value = self._pipeline(n.pipe, dot, scope) if n.pipe else None
                self._walk(self.defines[n.name], value, [("$", value)], out)
            elif kind == "break":
                raise _Break()
            elif kind == "continue":
                raise _Continue()

    def _range(self, n: _Node, dot: Any, scope: list[tuple[str, Any]], out: list[str]) -> None:
        pipe = n.pipe
        value = self._pipeline(_Pipe([], False, pipe.commands), dot, scope)
        if isinstance(value, dict):
            items = [(k, value[k]) for k in sorted(value)]
        elif isinstance(value, list):
            items = list(enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if pipe.declare and len(pipe.declare) > 1:
                raise GoTemplateError("can't use two variables ranging over an integer")
            items = [(i, i) for i in range(value)]
        elif value is None or value is MISSING:
            items = []
        else:
            raise GoTemplateError(f"range can't iterate over {go_print(value)}")
        if not items:
            if n.orelse is not None:
                self._walk(n.orelse, dot, scope, out)
            return
        mark = len(scope)
        for key, elem in items:
            del scope[mark:]
            if len(pipe.declare) == 1:
                scope.append((pipe.declare[0], elem))
            elif len(pipe.declare) == 2:
                scope.append((pipe.declare[0], key))
                scope.append((pipe.declare[1], elem))
            try:
                self._walk(n.body, elem, scope, out)
            except _Continue:
                continue
            except _Break:
                break
        del scope[mark:]

    # -- expressions --------------------------------------------------------------------------------------------

    def _pipeline(self, pipe: _Pipe, dot: Any, scope: list[tuple[str, Any]]) -> Any:
        value: Any = _NOTHING
        for cmd in pipe.commands:
            value = self._command(cmd, dot, scope, value)
        if pipe.declare:
            if pipe.assign:
                name = pipe.declare[0]
                for i in range(len(scope) - 1, -1, -1):
                    if scope[i][0] == name:
                        scope[i] = (name, value)
                        break
                else:
                    raise GoTemplateError(f"undefined variable: {name}")
            else:
                scope.append((pipe.declare[0], value))
        return value

    def _command(self, cmd: list[Any], dot: Any, scope: list[tuple[str, Any]], piped: Any) -> Any:
        head = cmd[0]
        if head[0] == "func":
            name = head[1]
            arg_nodes = cmd[1:]
            if name in ("and", "or"):
                args = [lambda a=a: self._operand(a, dot, scope) for a in arg_nodes]
                if piped is not _NOTHING:
                    args.append(lambda: piped)
                if not args:
                    raise GoTemplateError(f"wrong number of args for {name}")
                result = None
                for get in args:
                    result = get()
                    if truth(result) != (name == "and"):
                        return result
                return result
            args = [self._operand(a, dot, scope) for a in arg_nodes]
            if piped is not _NOTHING:
                args.append(piped)
            try:
                return self.funcs[name](*args)
            except GoTemplateError:
                raise
            except TypeError as e:
                raise GoTemplateError(f"error calling {name}: {e}") from None
        if len(cmd) > 1 or piped is not _NOTHING:
            raise GoTemplateError("can't give argument to non-function")
        return self._operand(head, dot, scope)

    def _operand(self, op: Any, dot: Any, scope: list[tuple[str, Any]]) -> Any:
        kind = op[0]
        if kind == "lit":
            return op[1]
        if kind == "nil":
            return None
        if kind == "dot":
            return dot
        if kind == "field":
            return self._fields(dot, op[1])
        if kind == "var":
            return self._variable(op[1], scope)
        if kind == "chain":
            return self._fields(self._operand(op[1], dot, scope), op[2])
        if kind == "pipe":
            return self._pipeline(op[1], dot, scope)
        if kind == "func":
            return self._command([op], dot, scope, _NOTHING)
        raise GoTemplateError(f"bad operand {op!r}")

    @staticmethod
    def _variable(name: str, scope: list[tuple[str, Any]]) -> Any:
        for n, v in reversed(scope):
            if n == name:
                return v
        raise GoTemplateError(f"undefined variable: {name}")

    @staticmethod
    def _fields(value: Any, names: list[str]) -> Any:
        for name in names:
            if isinstance(value, GoStruct):
                if name not in value.fields:
                    raise GoTemplateError(f"can't evaluate field {name} in type {value.type_name}")
                value = value.fields[name]
            elif isinstance(value, dict):
                value = value.get(name, MISSING)
            elif value is None or value is MISSING:
                raise GoTemplateError(f"nil pointer evaluating .{name}")
            else:
                raise GoTemplateError(f"can't evaluate field {name} in type {go_type(value)}")
        return value


_NOTHING = object()
