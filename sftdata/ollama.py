"""Ollama: the Modelfile ``TEMPLATE`` (a Go template) that renders what the training template renders.

Ollama does not run the Jinja chat template (older versions never do; newer ones only when they judge the GGUF's
template more capable than the Modelfile's): it renders a Go ``text/template`` over its own view of the request. This
module holds

* that view (:func:`values`), restated from Ollama's ``template`` package: messages after ``collate`` (consecutive
  messages of one role other than ``tool`` merged with a blank line, system messages also joined into ``.System``),
  each with ``Role Content Thinking Images ToolCalls ToolName ToolCallID``; tool calls ``ID`` and ``Function{Index
  Name Arguments}`` whose arguments print as JSON (Go's encoder: keys sorted, compact, ``<>&`` escaped); ``.Tools``
  with Ollama's fixed field set; ``.Think``/``.ThinkLevel``/``.IsThinkSet`` as the server sets them; the functions
  ``json``, ``currentDate``, ``yesterdayDate``;
* one Go template per built-in training template (``templates/ollama/NAME.gotmpl``), each opening with a comment that
  says what it covers and what Go templates cannot express;
* :func:`choose_template`: the Go template that renders like a training template on probe conversations (evaluated
  by :mod:`sftdata.gotemplate`), so the choice follows what the template does, not its name;
* :func:`modelfile`: the Modelfile text.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from sftdata.gotemplate import GoStruct, GoTemplate, GoTemplateError, Stringer, go_json

# --------------------------------------------------------------------------------------------------------------
# Ollama's view of a chat request
# --------------------------------------------------------------------------------------------------------------


class JSONList(list, Stringer):
    """A Go slice type whose ``String()`` is its JSON (Ollama's ``templateTools``); ``nil`` marshals as ``null``."""

    def __init__(self, items: list[Any] | None, go_type: str):
        super().__init__(items or [])
        self.go_type = go_type
        self.nil = items is None

    def go_string(self) -> str:
        return "null" if self.nil else go_json(list(self))


class TypedList(list):
    """A Go slice of a named element type (what ``%T`` prints); printed element by element."""

    def __init__(self, items: list[Any], go_type: str):
        super().__init__(items)
        self.go_type = go_type


class JSONMap(dict, Stringer):
    """A Go map type whose ``String()`` is its JSON, ``{}`` when nil (``templateArgs``, ``templateProperties``)."""

    def __init__(self, items: dict[str, Any] | None, go_type: str):
        super().__init__(items or {})
        self.go_type = go_type

    def go_string(self) -> str:
        return go_json(dict(self))


class PropertyType(list, Stringer):
    """``api.PropertyType``: one JSON Schema type prints and marshals as a string, several as a list."""

    go_type = "api.PropertyType"

    def go_string(self) -> str:
        return "" if not self else self[0] if len(self) == 1 else "[" + " ".join(self) + "]"

    def go_json(self) -> str:
        return go_json(self[0]) if len(self) == 1 else go_json(list(self))


def _json_number(value: Any) -> Any:
    """A decoded JSON value as Go decodes it into ``any``: every number a float64."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_number(v) for k, v in value.items()}
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _tool_property(spec: dict[str, Any]) -> GoStruct:
    kind = spec.get("type")
    props = spec.get("properties")
    return GoStruct("api.ToolProperty", {
        "AnyOf": [_tool_property(s) for s in spec.get("anyOf") or []],
        "Type": PropertyType([kind] if isinstance(kind, str) else list(kind or [])),
        "Items": _json_number(spec.get("items")),
        "Description": spec.get("description") or "",
        "Enum": _json_number(spec.get("enum") or []),
        "Properties": _OrderedProperties(props) if props is not None else None,
        "Required": list(spec.get("required") or []),
    }, {"AnyOf": "anyOf,omitempty", "Type": "type,omitempty", "Items": "items,omitempty",
        "Description": "description,omitempty", "Enum": "enum,omitempty", "Properties": "properties,omitempty",
        "Required": "required,omitempty"})


class _OrderedProperties(dict):
    """``*api.ToolPropertiesMap`` (nested ``properties``): marshals in insertion order, unlike a Go map."""

    def __init__(self, props: dict[str, Any]):
        super().__init__({k: _tool_property(v) for k, v in props.items()})

    def go_json(self) -> str:
        return "{" + ",".join(f"{go_json(k)}:{go_json(v)}" for k, v in self.items()) + "}"


def _json_of(value: GoStruct) -> str:
    return value.go_json()


def tool_value(tool: dict[str, Any]) -> GoStruct:
    """One OpenAI-style tool definition as Ollama hands it to a template (``templateTool``)."""
    fn = tool.get("function") or {}
    params = fn.get("parameters") or {}
    parameters = GoStruct("template.templateToolFunctionParameters", {
        "Type": params.get("type") or "",
        "Defs": _json_number(params.get("$defs")),
        "Items": _json_number(params.get("items")),
        "Required": list(params.get("required") or []),
        "Properties": JSONMap({k: _tool_property(v) for k, v in (params.get("properties") or {}).items()},
                              "template.templateProperties"),
    }, {"Type": "type", "Defs": "$defs,omitempty", "Items": "items,omitempty", "Required": "required,omitempty",
        "Properties": "properties"})
    function = GoStruct("template.templateToolFunction", {
        "Name": fn.get("name") or "", "Description": fn.get("description") or "", "Parameters": parameters,
    }, {"Name": "name", "Description": "description", "Parameters": "parameters"})
    return GoStruct("template.templateTool", {"Type": tool.get("type") or "", "Items": _json_number(tool.get("items")),
                                              "Function": function},
                    {"Type": "type", "Items": "items,omitempty", "Function": "function"}, stringer=_json_of)


def _tool_call(call: dict[str, Any], index: int) -> GoStruct:
    fn = call.get("function") or {}
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    return GoStruct("template.templateToolCall", {
        "ID": call.get("id") or "",
        "Function": GoStruct("template.templateToolCallFunction", {
            "Index": int(fn.get("index", index) or 0), "Name": fn.get("name") or "",
            "Arguments": JSONMap(_json_number(arguments) if arguments is not None else None, "template.templateArgs"),
        }),
    })


def ollama_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI / sftdata message as a client sends it to Ollama's ``/api/chat``: reasoning in ``thinking``, a tool
    result's function name in ``tool_name``, tool-call arguments as an object."""
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    reasoning = next((message[k] for k in ("thinking", "reasoning_content", "reasoning") if message.get(k)), None)
    if reasoning:
        out["thinking"] = reasoning
    if message.get("tool_calls"):
        calls = []
        for i, call in enumerate(message["tool_calls"]):
            fn = call.get("function") or {}
            arguments = fn.get("arguments")
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
            calls.append({**({"id": call["id"]} if call.get("id") else {}),
                          "function": {"index": i, "name": fn.get("name"), "arguments": arguments or {}}})
        out["tool_calls"] = calls
    if message.get("name") and message["role"] == "tool":
        out["tool_name"] = message["name"]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def collate(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's ``collate``: system messages joined into ``.System``; consecutive messages of one role (but ``tool``)
    merged into one, contents joined by a blank line."""
    system = [m.get("content") or "" for m in messages if m["role"] == "system"]
    collated: list[dict[str, Any]] = []
    for m in messages:
        if collated and collated[-1]["role"] == m["role"] and m["role"] != "tool":
            collated[-1] = {**collated[-1], "content": (collated[-1].get("content") or "") + "\n\n" +
                            (m.get("content") or "")}
        else:
            collated.append(m)
    return "\n\n".join(system), collated


def values(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
           think: bool | str | None = None) -> dict[str, Any]:
    """The data Ollama executes a chat TEMPLATE with, for ``messages`` in ``/api/chat`` form (see
    :func:`ollama_message`), ``tools`` and the request's ``think`` (absent, a bool, or a level such as ``"high"``)."""
    system, collated = collate(messages)
    if isinstance(think, str):
        think_on, level = think in ("high", "medium", "low", "max"), think
    else:
        think_on, level = bool(think), "medium" if think else ""
    return {
        "System": system,
        "Messages": TypedList([GoStruct("*template.templateMessage", {
            "Role": m["role"], "Content": m.get("content") or "", "Thinking": m.get("thinking") or "",
            "Images": [], "ToolCalls": [_tool_call(c, i) for i, c in enumerate(m.get("tool_calls") or [])],
            "ToolName": m.get("tool_name") or "", "ToolCallID": m.get("tool_call_id") or "",
        }) for m in collated], "[]*template.templateMessage"),
        "Tools": JSONList([tool_value(t) for t in tools] if tools is not None else None, "template.templateTools"),
        "Response": "", "Think": think_on, "ThinkLevel": level, "IsThinkSet": think is not None,
    }


def ollama_functions(today: datetime.date | None = None) -> dict[str, Callable[..., Any]]:
    """The functions Ollama adds to Go's builtins; ``today`` pins ``currentDate`` (tests, comparisons)."""
    def day() -> datetime.date:
        return today or datetime.date.today()

    def unsupported(*_: Any) -> str:
        raise GoTemplateError("toTypeScriptType is outside the supported subset")

    return {"json": go_json, "currentDate": lambda *_: day().isoformat(),
            "yesterdayDate": lambda *_: (day() - datetime.timedelta(days=1)).isoformat(),
            "toTypeScriptType": unsupported}


def parse(template: str, today: datetime.date | None = None) -> GoTemplate:
    """``template`` parsed with Ollama's functions. Ollama renders a template that never mentions ``.Messages`` once
    per message with ``.Prompt``/``.Response`` (its legacy path): that is outside what this module restates."""
    parsed = GoTemplate(template, ollama_functions(today))
    if "messages" not in parsed.identifiers():
        raise GoTemplateError("the template does not use .Messages (Ollama's per-message legacy path is not evaluated)")
    return parsed


def render(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
           think: bool | str | None = None, today: datetime.date | None = None) -> str:
    """What Ollama's server renders with the Go ``template`` for a chat request (messages in ``/api/chat`` form)."""
    return parse(template, today).execute(values(messages, tools, think))


# --------------------------------------------------------------------------------------------------------------
# The Go templates for the built-in training templates
# --------------------------------------------------------------------------------------------------------------

HELPERS_NAME = "_helpers"
_TOKEN_SLOT = re.compile(r"@@(bos_token|eos_token)@@")
_HEADER = re.compile(r"\A\{\{-? */\*(.*?)\*/ *-?\}\}\n?", re.S)
_DEFINE = re.compile(r'\{\{- define "([^"]+)" \}\}')


def ollama_template_dir() -> Path:
    from sftdata.templates import builtin_template_dir

    return builtin_template_dir() / "ollama"


@dataclass(frozen=True)
class OllamaTemplate:
    """One Go template of the library: ``body`` (with ``@@eos_token@@``-style slots for the tokenizer's special
    tokens), the header comment's ``notes`` (what it covers, what it cannot express), and the helper ``defines`` it
    calls (``{{ template "trim" . }}``), taken from ``_helpers.gotmpl``."""

    name: str
    body: str
    notes: str
    defines: str

    def text(self, special_tokens: dict[str, str] | None = None) -> str:
        """The TEMPLATE text for a tokenizer: helper definitions first (they render nothing), slots filled."""
        special = special_tokens or {}

        def fill(m: re.Match) -> str:
            token = special.get(m.group(1))
            if not token:
                raise KeyError(f"the Ollama template {self.name!r} needs {m.group(1)} and the tokenizer has none")
            return token.replace("{{", '{{ "{{" }}')

        return _TOKEN_SLOT.sub(fill, self.defines + self.body)


@lru_cache(maxsize=None)
def library() -> dict[str, OllamaTemplate]:
    """The Go templates under ``templates/ollama/``, by the name of the built-in training template they mirror."""
    directory = ollama_template_dir()
    text = (directory / f"{HELPERS_NAME}.gotmpl").read_text(encoding="utf-8")
    found = list(_DEFINE.finditer(text))  # each definition runs to the next one
    helpers = {m.group(1): text[m.start():found[i + 1].start() if i + 1 < len(found) else len(text)].rstrip("\n")
               for i, m in enumerate(found)}  # a newline between definitions would be printed
    out: dict[str, OllamaTemplate] = {}
    for path in sorted(directory.glob("*.gotmpl")):
        if path.stem == HELPERS_NAME:
            continue
        source = path.read_text(encoding="utf-8")
        header = _HEADER.match(source)
        if not header:
            raise ValueError(f"{path} does not open with a {{{{- /* description */ -}}}} comment")
        body = source[header.end():]
        if body.endswith("}}\n"):  # the file's final newline; a template ends with an action
            body = body[:-1]
        used = _uses(body, helpers)
        paragraphs = re.split(r"\n\s*\n", header.group(1).strip())  # blank lines separate paragraphs
        notes = "\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
        out[path.stem] = OllamaTemplate(path.stem, body, notes, "".join(helpers[n] for n in used))
    return out


def _uses(body: str, helpers: dict[str, str]) -> list[str]:
    """The helper definitions ``body`` needs, including those the helpers themselves call, in file order."""
    needed: set[str] = set()
    todo = [body]
    while todo:
        text = todo.pop()
        for name in re.findall(r'\{\{-? ?template "([^"]+)"', text):
            if name not in needed:
                if name not in helpers:
                    raise ValueError(f'the Ollama templates have no helper "{name}"')
                needed.add(name)
                todo.append(helpers[name])
    return [n for n in helpers if n in needed]


# --------------------------------------------------------------------------------------------------------------
# Probe conversations: the serving prompts of sftdata's verify suite
# --------------------------------------------------------------------------------------------------------------

# Ollama's `think` request field and the Jinja keywords a server passes for the same request.
THINK_VARIANTS: tuple[tuple[bool | str | None, dict[str, Any]], ...] = (
    (None, {}), (True, {"enable_thinking": True, "reasoning_effort": "medium"}), (False, {"enable_thinking": False}),
    ("high", {"enable_thinking": True, "reasoning_effort": "high"}))


@dataclass(frozen=True)
class Probe:
    """A serving prompt: ``messages`` (OpenAI form, as the Jinja template gets them) up to an assistant turn, the
    case's ``tools``, and the request's ``think`` with the matching Jinja ``kwargs``."""

    name: str
    feature: str  # plain | tools | reasoning
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None
    think: bool | str | None
    kwargs: tuple[tuple[str, Any], ...]


def probes(template_source: str, *, core_only: bool = False) -> list[Probe]:
    """Every serving prompt ``P_k`` of the verify suite (``sftdata.verify.SUITE``), in each ``think`` variant the
    template reacts to (``enable_thinking`` / ``reasoning_effort``)."""
    from sftdata.verify import SUITE

    variants = [v for v in THINK_VARIANTS if v[0] is None or any(k in template_source for k in v[1])]
    out = []
    for case in SUITE:
        if core_only and not case.core:
            continue
        messages = case.dicts()
        for k, m in enumerate(messages):
            if m["role"] != "assistant" or k == 0:
                continue
            for think, kwargs in variants:
                suffix = "" if think is None else f" think={think}"
                out.append(Probe(f"{case.name}[:{k}]{suffix}", case.feature or "plain", tuple(messages[:k]),
                                 case.tools, think, tuple(sorted(kwargs.items()))))
    return out


@dataclass
class ProbeResult:
    probe: Probe
    jinja: str | None  # None: the training template refuses the conversation
    ollama: str | None  # None: the Go template failed
    error: str = ""

    @property
    def equal(self) -> bool:
        return self.jinja is not None and self.jinja == self.ollama


def compare(go_template: str, jinja: Any, probe_list: list[Probe], *, today: datetime.date | None = None,
            stop_at_first_difference: bool = False, strip_bos: bool = True) -> list[ProbeResult]:
    """Render each probe with the training template (``ChatTemplate``, generation prompt on, a leading BOS stripped
    when ``strip_bos``: llama.cpp adds it) and with the Go template as Ollama would; conversations the training
    template refuses are kept with ``jinja=None`` (no claim either way)."""
    from sftdata.render import _tool_call_message, tool_call_form

    day = today or datetime.date.today()
    as_string, as_none = tool_call_form(jinja)
    bos = (jinja.special_tokens.get("bos_token") or "") if strip_bos else ""
    parsed = parse(go_template, day)
    results = []
    for p in probe_list:
        messages = [_tool_call_message(m, as_string, as_none) if m.get("tool_calls") else m for m in p.messages]
        try:
            want = jinja.render(messages, add_generation_prompt=True, tools=list(p.tools) if p.tools else None,
                                strftime_now=day.strftime, **dict(p.kwargs))
            if bos and want.startswith(bos):
                want = want[len(bos):]
        except Exception:
            want = None
        error = ""
        try:
            got = parsed.execute(values([ollama_message(m) for m in p.messages], list(p.tools) if p.tools else None,
                                        p.think))
        except GoTemplateError as e:
            got, error = None, str(e)
        results.append(ProbeResult(p, want, got, error))
        if stop_at_first_difference and want is not None and want != got:
            break
    return results


# --------------------------------------------------------------------------------------------------------------
# Choosing the TEMPLATE for a training template, and the Modelfile
# --------------------------------------------------------------------------------------------------------------

FEATURES = ("plain", "tools", "reasoning")
_KIND = {"plain": "plain", "tools": "from tool-call conversations", "reasoning": "from reasoning conversations"}


@dataclass
class OllamaChoice:
    """The Go template chosen for a training template and what the comparison showed: ``equal`` and ``differ``
    count serving prompts per feature (``plain``, ``tools``, ``reasoning``); ``equivalent`` when none differs (else
    the plain prompts all agree and ``differ`` says which features do not)."""

    name: str
    text: str
    notes: str
    equivalent: bool
    equal: dict[str, int] = field(default_factory=dict)
    differ: dict[str, int] = field(default_factory=dict)
    refused: int = 0

    def summary(self) -> str:
        counts = ", ".join(f"{n} {_KIND[k]}" for k, n in self.equal.items() if n)
        total = sum(self.equal.values())
        text = (f"the Go template for the built-in `{self.name}` template (templates/ollama/{self.name}.gotmpl), "
                f"rendered by sftdata's Go-template evaluator as Ollama renders it: identical to the training "
                f"template (BOS aside) on {total} serving prompts of sftdata's verify suite ({counts})")
        if not self.equivalent:
            text += ("; it DIFFERS on " + ", ".join(f"{n} {_KIND[k]}" for k, n in self.differ.items() if n) +
                     ": such conversations are not served as they were trained")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "equivalent": self.equivalent, "equal": self.equal, "differ": self.differ,
                "refused_by_training_template": self.refused}


def _tally(results: list[ProbeResult]) -> tuple[dict[str, int], dict[str, int], int]:
    equal = {f: 0 for f in FEATURES}
    differ = {f: 0 for f in FEATURES}
    refused = 0
    for r in results:
        if r.jinja is None:
            refused += 1
        elif r.equal:
            equal[r.probe.feature] += 1
        else:
            differ[r.probe.feature] += 1
    return equal, differ, refused


def choose_template(source: str | None, special_tokens: dict[str, str], *, prefer: str | None = None,
                    today: datetime.date | None = None, adds_bos: bool = True) -> OllamaChoice | None:
    """The library's Go template that renders like the Jinja ``source`` on every serving prompt of the probe suite
    (BOS aside); failing that, one that agrees on every plain prompt (its ``differ`` names the features that do not
    render alike); None when none agrees on the plain prompts. ``prefer`` (the build's template name) is tried
    first; the choice follows what the template renders, not its name. ``adds_bos``: llama.cpp adds the BOS the
    template writes first (the GGUF's ``add_bos_token``), so the Go templates leave it out."""
    from sftdata.templates import ChatTemplate

    if not source:
        return None
    jinja = ChatTemplate("training", source, dict(special_tokens))
    probe_list = probes(source)
    plain = [p for p in probe_list if p.feature == "plain"]
    lib = library()
    order = sorted(lib, key=lambda n: n != prefer)
    texts = {}
    for name in order:
        try:
            texts[name] = lib[name].text(special_tokens)
        except KeyError:  # needs a special token this tokenizer does not have
            continue
    for name, text in texts.items():
        results = compare(text, jinja, probe_list, today=today, stop_at_first_difference=True, strip_bos=adds_bos)
        equal, differ, refused = _tally(results)
        if not any(differ.values()) and any(equal.values()):
            return OllamaChoice(name, text, lib[name].notes, True, equal, differ, refused)
    for name, text in texts.items():
        results = compare(text, jinja, plain, today=today, stop_at_first_difference=True, strip_bos=adds_bos)
        equal, differ, _ = _tally(results)
        if not any(differ.values()) and equal["plain"]:
            equal, differ, refused = _tally(compare(text, jinja, probe_list, today=today, strip_bos=adds_bos))
            return OllamaChoice(name, text, lib[name].notes, False, equal, differ, refused)
    return None


def _comment(text: str, width: int = 116) -> list[str]:
    import textwrap

    lines = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, width - 2, break_long_words=False, break_on_hyphens=False) or [""]
    return ["# " + line if line else "#" for line in lines]


def modelfile(gguf_name: str, choice: OllamaChoice | None, stops: list[str], template_name: str | None = None,
              template_kwargs: dict[str, Any] | None = None) -> str:
    """The Modelfile: ``FROM``, the ``TEMPLATE`` with comments on what it covers (or why there is none), and one
    ``PARAMETER stop`` per end-of-turn marker."""
    lines = [f"FROM ./{gguf_name}"]
    if choice is not None and '"""' in choice.text:
        lines += _comment(f"No TEMPLATE: the Go template for `{choice.name}` would contain \"\"\" (from a special "
                          "token), which a Modelfile cannot quote.")
    elif choice is not None:
        lines += _comment("TEMPLATE: " + choice.summary() + ".")
        lines += _comment(choice.notes)
        lines += _comment("Before any TEMPLATE runs, Ollama merges consecutive messages of one role (but tool) into one "
                          "message, joined by a blank line: such conversations are served unlike their training "
                          "render.")
        passed = {k: v for k, v in (template_kwargs or {}).items() if k not in ("enable_thinking", "reasoning_effort")}
        if passed:
            lines += _comment(f"The build passed the template keywords {json.dumps(passed, ensure_ascii=False)}: an "
                              "Ollama request cannot pass them, so this TEMPLATE renders the template's defaults.")
        lines.append(f'TEMPLATE """{choice.text}"""')
    else:
        lines += _comment(
            f"No TEMPLATE: no Go template that sftdata writes renders like the training template "
            f"({template_name or 'custom'}) on the plain serving prompts of sftdata's verify suite. Without one, "
            "`ollama create` takes a template of its own library when the GGUF's tokenizer.chat_template (the "
            "training template) is close to one it knows, and recent Ollama versions otherwise render the "
            "tokenizer.chat_template itself: check what is served with `ollama show --template`, or serve the GGUF "
            "with `llama-server --jinja`.")
    for s in stops:
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
