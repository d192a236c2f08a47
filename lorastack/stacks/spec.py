"""A Stack spec: named stages over the input and each other's outputs, loaded from YAML.

Three kinds of stage, told apart by their keys:
- a *model* stage (`model:` a route SPEC) renders its `prompt` and asks the engine;
- a *map* stage (`map:` a template yielding a list, plus `model:`) runs its prompt once per
  item (`{item}`) and joins the answers — map-reduce over parts of the input;
- a *transform* stage (no `model:`) makes no model call: its output is its rendered
  `prompt` put through its `parse` steps (regex, JSON field, split, reverse, join, strip...).

Templates know three placeholders: `{input}`, `{stages.NAME.output}` and, in map stages,
`{item}`. Every other brace is literal, so prompts may hold JSON. Stages form a DAG (a
stage may read any earlier-computed stage, not only its predecessor); the last stage, or the
one named by `output:`, is the answer. Validation fails with one line naming the problem.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapter import NESTED_QUANTIFIER
from ..errors import LorastackError
from ..names import InvalidNameError, validate_name

PLACEHOLDER = re.compile(r"\{(input|item|stages\.([A-Za-z0-9_-]+)\.output)\}")
# Anything shaped like a placeholder ({word} or {a.b.c}) that is not one of the three is a
# typo, not literal text; JSON in a prompt ({"a": 1}) never has this shape.
SUSPECT = re.compile(r"\{[A-Za-z_][\w.-]*\}")
STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
MAX_STAGES = 32
MAX_MAP_ITEMS = 64
PARSERS = ("regex", "replace", "json_field", "strip", "first_line", "split", "chars", "join", "lower", "reverse")


class StackError(LorastackError):
    """A stack spec that does not validate, or a stage that fails at run time."""


@dataclass(frozen=True)
class Template:
    text: str
    refs: tuple[str, ...]  # stage names read by this template
    uses_item: bool

    @classmethod
    def parse(cls, text: Any, where: str, allow_item: bool = False) -> "Template":
        if not isinstance(text, str) or not text:
            raise StackError(f"{where}: needs a non-empty template string")
        found = {m.group(0) for m in PLACEHOLDER.finditer(text)}
        for m in SUSPECT.finditer(text):
            if m.group(0) not in found:
                raise StackError(f"{where}: bad placeholder {m.group(0)!r}; use {{input}}, {{stages.NAME.output}}"
                                 + (" or {item}" if allow_item else ""))
        uses_item = "{item}" in found
        if uses_item and not allow_item:
            raise StackError(f"{where}: {{item}} is only defined inside a map stage")
        refs = tuple(dict.fromkeys(m.group(2) for m in PLACEHOLDER.finditer(text) if m.group(2)))
        return cls(text, refs, uses_item)

    def render(self, input_text: str, outputs: dict[str, str], item: str | None = None) -> str:
        def sub(m: re.Match) -> str:
            if m.group(1) == "input":
                return input_text
            if m.group(1) == "item":
                return item or ""
            return outputs[m.group(2)]

        return PLACEHOLDER.sub(sub, self.text)


@dataclass(frozen=True)
class ParseStep:
    """One output-parsing step; applied in order to a stage's raw output."""

    kind: str
    arg: Any = None
    group: int = 0

    def apply(self, value: str | list[str], stage: str) -> str | list[str]:
        if self.kind == "reverse":  # list order, e.g. after `split`; a plain text's lines
            return value[::-1] if isinstance(value, list) else "\n".join(value.splitlines()[::-1])
        if self.kind == "chars":  # one item per character, so a map stage can work letter by letter
            texts = value if isinstance(value, list) else [value]
            return [c for t in texts for c in t if not c.isspace()]
        if isinstance(value, list) and self.kind != "join":
            return [self._one(v, stage) for v in value]  # type: ignore[misc]
        if self.kind == "join":
            return str(self.arg).join(value) if isinstance(value, list) else value
        return self._one(value, stage)

    def _one(self, text: str, stage: str) -> str | list[str]:
        if self.kind == "strip":
            return text.strip()
        if self.kind == "lower":
            return text.lower()
        if self.kind == "first_line":
            return next((line.strip() for line in text.splitlines() if line.strip()), "")
        if self.kind == "split":
            return [p.strip() for p in text.split(self.arg) if p.strip()]
        if self.kind == "regex":
            m = self.arg.search(text)
            return m.group(self.group) if m else ""
        if self.kind == "replace":
            pattern, repl = self.arg
            return pattern.sub(repl, text)
        if self.kind == "json_field":
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                return ""
            value = obj.get(self.arg, "") if isinstance(obj, dict) else ""
            return value if isinstance(value, str) else json.dumps(value)
        raise StackError(f"stage {stage!r}: unknown parser {self.kind!r}")


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # "model" | "map" | "transform"
    prompt: Template
    model: str | None = None
    over: Template | None = None  # map stages: the list to map over
    split: str = "\n"  # map stages: how `over` becomes items (a JSON list is used as is)
    join: str = "\n"  # map stages: how the answers are joined
    max_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    parse: tuple[ParseStep, ...] = ()
    train: bool = False

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.prompt.refs + (self.over.refs if self.over else ())))

    def finish(self, raw: str) -> str:
        """The stage's output: its raw text put through its parse steps (lists joined by newline)."""
        value: str | list[str] = raw
        for step in self.parse:
            value = step.apply(value, self.name)
        return "\n".join(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class StackSpec:
    name: str
    stages: tuple[Stage, ...]
    output: str
    description: str = ""
    order: tuple[tuple[str, ...], ...] = field(default=())  # stages grouped in waves that can run together
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def models(self) -> list[str]:
        return [s.model for s in self.stages if s.model]


def _parse_steps(raw: Any, where: str) -> tuple[ParseStep, ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    steps = []
    for i, item in enumerate(items):
        at = f"{where}.parse[{i}]"
        if isinstance(item, str):
            item = {item: True}
        if not isinstance(item, dict) or len(item) - ("group" in item) != 1:
            raise StackError(f"{at}: give one parser per step, e.g. {{regex: '\\d+'}}, {{json_field: born}}, strip, first_line")
        kind = next(k for k in item if k != "group")
        if kind not in PARSERS:
            raise StackError(f"{at}: unknown parser {kind!r} (known: {', '.join(PARSERS)})")
        arg = item[kind]
        if kind in ("regex", "replace") and NESTED_QUANTIFIER.search(str(arg[0] if isinstance(arg, list) and arg else arg)):
            raise StackError(f"{at}: regex {arg!r} nests quantifiers (e.g. (a+)*): it could take forever on some inputs")
        if kind == "regex":
            try:
                arg = re.compile(str(arg))
            except re.error as e:
                raise StackError(f"{at}: regex {item[kind]!r} does not compile ({e})") from None
            group = item.get("group", 1 if arg.groups else 0)
            if not isinstance(group, int) or not 0 <= group <= arg.groups:
                raise StackError(f"{at}: group {group!r} does not exist in regex {item[kind]!r}")
            steps.append(ParseStep(kind, arg, group))
            continue
        if kind == "replace":
            if not isinstance(arg, list) or len(arg) != 2 or not all(isinstance(a, str) for a in arg):
                raise StackError(f"{at}: replace takes [PATTERN, REPLACEMENT]")
            try:
                pattern = re.compile(arg[0])
                names = {i: n for n, i in pattern.groupindex.items()}
                same_groups = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1))
                re.compile(same_groups).match("").expand(arg[1])  # a bad group reference fails here, not mid-run
            except re.error as e:
                raise StackError(f"{at}: replace {arg!r} does not compile ({e})") from None
            steps.append(ParseStep(kind, (pattern, arg[1])))
            continue
        if kind == "chars" and arg is not True:
            raise StackError(f"{at}: {kind} takes no argument; write it as a plain list item: - {kind}")
        if kind in ("split", "join", "json_field") and (not isinstance(arg, str) or (kind != "join" and not arg)):  # split "" would raise
            raise StackError(f"{at}: {kind} needs a string argument")
        steps.append(ParseStep(kind, arg))
    return tuple(steps)


def _stage(raw: Any, i: int) -> Stage:
    where = f"stages[{i}]"
    if not isinstance(raw, dict):
        raise StackError(f"{where}: each stage is a mapping with at least 'name' and 'prompt'")
    known = {"name", "prompt", "model", "map", "split", "join", "max_tokens", "temperature", "stop", "parse", "train"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise StackError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    name = raw.get("name")
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
        raise StackError(f"{where}: stage name {name!r} must be 1-64 letters, digits, '_' or '-', starting with a letter")
    where = f"stage {name!r}"
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise StackError(f"{where}: model must be a SPEC string (an adapter, a mixture, auto or base)")
    is_map = "map" in raw
    if is_map and model is None:
        raise StackError(f"{where}: a map stage needs a model to run per item")
    kind = "map" if is_map else ("model" if model is not None else "transform")
    max_tokens = raw.get("max_tokens", 64)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 1024:
        raise StackError(f"{where}: max_tokens must be an integer from 1 to 1024")
    temperature = raw.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise StackError(f"{where}: temperature must be a number from 0 to 2")
    stop = raw.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise StackError(f"{where}: stop must be a string or a list of strings")
    for key in ("split", "join"):
        if key in raw and not isinstance(raw[key], str):
            raise StackError(f"{where}: {key} must be a string")
    if raw.get("split", "\n") == "":
        raise StackError(f"{where}: split must not be empty")
    return Stage(
        name=name, kind=kind, prompt=Template.parse(raw.get("prompt"), f"{where}: prompt", allow_item=is_map),
        model=model.strip() if isinstance(model, str) else None,
        over=Template.parse(raw["map"], f"{where}: map") if is_map else None,
        split=raw.get("split", "\n"), join=raw.get("join", "\n"), max_tokens=max_tokens, temperature=float(temperature),
        stop=tuple(stop), parse=_parse_steps(raw.get("parse"), where), train=bool(raw.get("train", False)),
    )


def map_items(text: str, split: str) -> list[str]:
    """A map stage's items: a JSON list if the text is one, else the text split on `split`."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
            if isinstance(value, list):
                return [v if isinstance(v, str) else json.dumps(v) for v in value]
        except (ValueError, RecursionError):
            pass
    return [p.strip() for p in text.split(split) if p.strip()]


def waves(stages: tuple[Stage, ...]) -> tuple[tuple[str, ...], ...]:
    """Topological order in waves: every stage of a wave depends only on earlier waves, so a
    wave's stages can run concurrently. Raises on an unknown reference or a cycle."""
    names = {s.name for s in stages}
    deps = {}
    for s in stages:
        for r in s.refs:
            if r not in names:
                raise StackError(f"stage {s.name!r} reads {{stages.{r}.output}}, but there is no stage {r!r}")
            if r == s.name:
                raise StackError(f"stage {s.name!r} reads its own output")
        deps[s.name] = set(s.refs)
    done: set[str] = set()
    out = []
    while len(done) < len(stages):
        wave = tuple(s.name for s in stages if s.name not in done and deps[s.name] <= done)
        if not wave:
            stuck = sorted(n for n in deps if n not in done)
            raise StackError(f"stages {', '.join(stuck)} form a cycle (each waits for another's output)")
        out.append(wave)
        done |= set(wave)
    return tuple(out)


def parse_stack(obj: Any, where: str = "stack") -> StackSpec:
    """Validate a stack spec given as a parsed YAML/JSON mapping."""
    if not isinstance(obj, dict):
        raise StackError(f"{where}: a stack spec is a mapping with 'name' and 'stages'")
    unknown = sorted(set(obj) - {"name", "description", "stages", "output"})
    if unknown:
        raise StackError(f"{where}: unknown key {unknown[0]!r} (known: name, description, stages, output)")
    name = obj.get("name")
    try:
        validate_name(name)
    except InvalidNameError as e:
        raise StackError(f"{where}: stack {e}".replace("adapter name", "name")) from None
    raw_stages = obj.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise StackError(f"{where}: 'stages' must be a non-empty list")
    if len(raw_stages) > MAX_STAGES:
        raise StackError(f"{where}: {len(raw_stages)} stages; at most {MAX_STAGES}")
    stages = tuple(_stage(s, i) for i, s in enumerate(raw_stages))
    seen: set[str] = set()
    for s in stages:
        if s.name in seen:
            raise StackError(f"{where}: two stages are named {s.name!r}")
        seen.add(s.name)
    output = obj.get("output", stages[-1].name)
    if output not in seen:
        raise StackError(f"{where}: output {output!r} is not a stage")
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise StackError(f"{where}: description must be a string")
    return StackSpec(name=name, stages=stages, output=output, description=description, order=waves(stages), source=obj)


MAX_SPEC_BYTES = 256 << 10


class _NoAliasLoader(yaml.SafeLoader):
    """YAML anchors/aliases can expand a 1 KB file into gigabytes ("billion laughs"); a
    stack spec never needs them."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in stack specs", event.start_mark)
        return super().compose_node(parent, index)


def load_stack(path: str | Path) -> StackSpec:
    """Read and validate a YAML stack spec; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StackError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StackError(f"{path}: cannot read ({e})") from None
    if len(text) > MAX_SPEC_BYTES:
        raise StackError(f"{path}: {len(text)} bytes; a stack spec is at most {MAX_SPEC_BYTES}")
    try:
        obj = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader without aliases
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        raise StackError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise StackError(f"{path}: not valid YAML (nested too deeply)") from None
    return parse_stack(obj, str(path))


def dump_stack(spec: StackSpec) -> str:
    return yaml.safe_dump(spec.source, sort_keys=False, allow_unicode=True)
