"""Constrained decoding: a row's output is forced to be JSON (or an instance of a JSON schema)
by masking its next-token logits to the tokens the grammar allows, right before sampling.

The grammar work is xgrammar's (a maintained C++ library: JSON schema → grammar → per-token
bitmask over the whole vocabulary). It was chosen over outlines-core because it compiles a
real context-free grammar (any JSON nesting, recursive `$ref`s), where outlines-core needs a
regular expression (no recursion, so `json_object` would need a depth-bounded regex), and its
mask is cheap here: `python bench/structured.py` prints the per-token cost on the embedded
base's 49k vocab. Its package declares triton (~290 MB, GPU kernels) as a Linux dependency it
does not use on CPU, so it is installed with `--no-deps` (see the Makefile); without it a
constrained request is a clear error, everything else works.

Each constrained request gets its own matcher (its grammar state), so rows with different
schemas and unconstrained rows decode in one batch: the engine masks only the constrained
rows, then advances each matcher with the token its row picked.

xgrammar silently ignores schema keywords it does not enforce (e.g. `uniqueItems`, `not`),
so `check_schema` accepts only the subset whose outputs are verified against the schema in
tests/test_structured.py and names every other keyword in its error.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EngineError, LorastackError

# Keywords that only describe (no constraint on the output), accepted anywhere.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly"})
# Keywords whose constraint the grammar enforces (tests check the outputs with `jsonschema`).
ENFORCED = frozenset({
    "type", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
MAX_SCHEMA_DEPTH = 64
# Compiling a `pattern` costs time linear in its expanded bounded repetitions (measured on the
# 49k vocab: [a-z]{1,5000} took 4.9 s, (a{1,100}){1,100} 0.9 s, in C++ that cannot be
# interrupted), so the product of a pattern's {m,n} bounds, summed over the schema, is capped.
MAX_PATTERN_REPEATS = 2048
MAX_PATTERN_CHARS = 1000
# Compile time also grows faster than linearly with optional properties (measured, 600-token
# vocab: 400 optional properties 0.16 s, 900 took 3 s, 3000 did not finish in 100 s), so the
# number of subschemas and of properties per object are capped too.
MAX_SCHEMA_NODES = 512
MAX_PROPERTIES = 256
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
INSTALL_HINT = "pip install --no-deps xgrammar apache-tvm-ffi"


class SchemaError(LorastackError):
    """A JSON schema this engine cannot enforce (unsupported keyword, malformed)."""


@dataclass(frozen=True)
class Constraint:
    """What a row's output must be: any JSON object (`schema` None) or an instance of `schema`.

    `schema` is JSON text (key order kept: properties come out in schema order), so equal
    schemas share one compiled grammar and the Constraint stays hashable inside `Sampling`."""

    schema: str | None = None

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls(None)

    @classmethod
    def json_schema(cls, schema: Any) -> "Constraint":
        """Checks `schema` against the supported subset (SchemaError names what is not)."""
        check_schema(schema)
        return cls(json.dumps(schema, ensure_ascii=False))

    def describe(self) -> str:
        return "a JSON object" if self.schema is None else f"JSON matching the schema {self.schema[:200]}"


def check_schema(schema: Any) -> None:
    """Raise SchemaError naming every keyword (with its path) outside the enforced subset."""
    if not isinstance(schema, dict):
        raise SchemaError(f"the JSON schema must be an object, got {type(schema).__name__}")
    bad: list[str] = []
    _walk(schema, "#", bad, 0, _Budget())
    if bad:
        raise SchemaError("unsupported JSON schema keyword(s): " + ", ".join(bad[:20])
                          + f" (supported: {', '.join(sorted(ENFORCED))}; annotations like title/description are ignored)")


@dataclass
class _Budget:
    """What compiling the schema will cost, counted while walking it."""

    nodes: int = 0
    repeats: int = 0


def _walk(node: Any, path: str, bad: list[str], depth: int, budget: _Budget) -> None:
    if isinstance(node, bool):
        return  # `true` / `false` schemas
    if not isinstance(node, dict):
        raise SchemaError(f"{path}: a schema must be an object or a boolean, got {type(node).__name__}")
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"{path}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    budget.nodes += 1
    if budget.nodes > MAX_SCHEMA_NODES:
        raise SchemaError(f"the schema has more than {MAX_SCHEMA_NODES} subschemas (at {path})")
    for key, value in node.items():
        here = f"{path}/{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            bad.append(f"{key!r} at {path}")
        elif key == "type":
            types = value if isinstance(value, list) else [value]
            if not types or any(t not in TYPES for t in types):
                raise SchemaError(f"{here}: type must be one of {', '.join(sorted(TYPES))} (or a list of them), got {value!r}")
        elif key == "$ref":
            if not isinstance(value, str) or not value.startswith("#"):
                raise SchemaError(f"{here}: only local references ('#/$defs/NAME') are supported, got {value!r}")
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise SchemaError(f"{here}: must be an object of schemas")
            if key == "properties" and len(value) > MAX_PROPERTIES:
                raise SchemaError(f"{here}: {len(value)} properties; at most {MAX_PROPERTIES} per object")
            for name, sub in value.items():
                _walk(sub, f"{here}/{name}", bad, depth + 1, budget)
        elif key in ("anyOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise SchemaError(f"{here}: must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                _walk(sub, f"{here}/{i}", bad, depth + 1, budget)
        elif key in ("items", "additionalProperties"):
            _walk(value, here, bad, depth + 1, budget)
        elif key == "required" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise SchemaError(f"{here}: must be a list of property names")
        elif key == "enum" and not (isinstance(value, list) and value):
            raise SchemaError(f"{here}: must be a non-empty list")
        elif key == "pattern":
            budget.repeats += _pattern_cost(value, here)
            if budget.repeats > MAX_PATTERN_REPEATS:
                raise SchemaError(f"{here}: the patterns' bounded repetitions ({{m,n}}, multiplied within a pattern, summed "
                                  f"over the schema) exceed {MAX_PATTERN_REPEATS}; bound long strings with maxLength instead")


def _pattern_cost(pattern: Any, where: str) -> int:
    """The product of a pattern's repetition bounds (conservatively, as if all were nested)."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaError(f"{where}: must be a regular expression of at most {MAX_PATTERN_CHARS} characters")
    cost = 1
    for low, high in _REPEAT.findall(pattern):
        cost *= max(int(low), int(high or 0), 1)
        if cost > MAX_PATTERN_REPEATS:
            break
    return cost


class Grammars:
    """Compiles constraints for one tokenizer (cached) and makes a matcher per request.

    Compiling happens on the submitting thread (a bad schema fails the submit, not a batch);
    masks and matcher updates happen on the engine thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int, cache_size: int = 64) -> None:
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise LorastackError(f"structured output needs the xgrammar package ({INSTALL_HINT})") from e
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos_token_id])
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=64 << 20)
        vocab = info.decoded_vocab
        self.utf8 = _Utf8(vocab)
        # Per UTF-8 state of the output so far (_STATES): the tokens that may come next, also
        # free of control bytes (see RowGrammar).
        self.masks = [_packed_mask([not any(b < 0x20 for b in t) and nxt[j] >= 0 for j, t in enumerate(vocab)], vocab_size)
                      for nxt in self.utf8.after]
        self._lock = threading.Lock()
        self._compiled: dict[Constraint, Any] = {}
        self._cache_size = cache_size

    def compiled(self, c: Constraint) -> Any:
        with self._lock:
            hit = self._compiled.pop(c, None)
            if hit is None:
                # Compact output (no free whitespace): fewer tokens, and no way for a weak model
                # to pad forever. strict_mode: an object without an explicit additionalProperties
                # gets only its listed properties (still valid under the schema).
                schema = c.schema if c.schema is not None else '{"type": "object"}'
                try:
                    hit = self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=c.schema is not None)
                except Exception as e:  # noqa: BLE001 - xgrammar's message says what it rejected
                    why = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip().splitlines()[-1])  # drop "[time] file.cc:N: "
                    raise SchemaError(f"cannot compile the JSON schema: {why[:300]}") from e
            self._compiled[c] = hit
            while len(self._compiled) > self._cache_size:
                self._compiled.pop(next(iter(self._compiled)))
            return hit

    def matcher(self, c: Constraint) -> "RowGrammar":
        return RowGrammar(self._xgr.GrammarMatcher(self.compiled(c)), c, self.masks, self.utf8)


# UTF-8 decoding states between tokens: (continuation bytes owed, lowest and highest byte the
# next one may be). The narrow ranges after E0, ED, F0 and F4 exclude overlong forms and UTF-16
# surrogates (ED A0-BF ..), which Python and JSON parsers decode as U+FFFD.
_STATES = ((0, 0x80, 0xBF), (1, 0x80, 0xBF), (2, 0x80, 0xBF), (2, 0xA0, 0xBF), (2, 0x80, 0x9F),
           (3, 0x80, 0xBF), (3, 0x90, 0xBF), (3, 0x80, 0x8F))
_STATE = {s: i for i, s in enumerate(_STATES)}


def _utf8_step(state: tuple[int, int, int], x: int) -> tuple[int, int, int] | None:
    owed, lo, hi = state
    if owed:
        return (owed - 1, 0x80, 0xBF) if lo <= x <= hi else None
    if x < 0x80:
        return state
    if 0xC2 <= x <= 0xDF:
        return (1, 0x80, 0xBF)
    if 0xE0 <= x <= 0xEF:
        return (2, 0xA0 if x == 0xE0 else 0x80, 0x9F if x == 0xED else 0xBF)
    if 0xF0 <= x <= 0xF4:
        return (3, 0x90 if x == 0xF0 else 0x80, 0x8F if x == 0xF4 else 0xBF)
    return None


class _Utf8:
    """Keeps a constrained row's bytes valid UTF-8. xgrammar matches bytes, and its string rules
    admit byte-level tokens that garble a character: a random model wrote the UTF-16 surrogate
    bytes ED A4 AB inside a string ('xpreޑ갔Ť���', 10 characters once decoded where the schema
    said maxLength 8, and xgrammar had counted 8). `after[s][t]` is the state after token t from
    state s, or -1 when t cannot follow there."""

    def __init__(self, vocab: list[bytes]) -> None:
        self.after = [[-1] * len(vocab) for _ in _STATES]
        for t, raw in enumerate(vocab):
            if all(x < 0x80 for x in raw):  # most tokens: only after a complete character
                self.after[0][t] = 0
                continue
            for si, state in enumerate(_STATES):
                cur: tuple[int, int, int] | None = state
                for x in raw:
                    cur = _utf8_step(cur, x)
                    if cur is None:
                        break
                if cur is not None:
                    self.after[si][t] = _STATE[cur]


def _packed_mask(allowed: list[bool], vocab_size: int) -> torch.Tensor:
    """`allowed` as a bitmask in xgrammar's layout (bit j of int32 word w is token 32w+j)."""
    bits = torch.zeros((vocab_size + 31) // 32 * 32, dtype=torch.int64)
    bits[: len(allowed)] = torch.tensor(allowed, dtype=torch.int64)
    words = (bits.view(-1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class RowGrammar:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any, constraint: Constraint, masks: list[torch.Tensor], utf8: _Utf8) -> None:
        self.matcher = matcher
        self.constraint = constraint
        # xgrammar lets raw control characters into length- or pattern-bounded strings (seen
        # with maxLength: '"\x0c"'), which no JSON parser accepts; output here is compact
        # (no newlines or tabs), so tokens holding bytes below 0x20 are never needed. The masks
        # also keep the bytes valid UTF-8 (_Utf8), one mask per decoding state.
        self.masks, self.utf8, self.state = masks, utf8, 0

    @property
    def extra_mask(self) -> torch.Tensor:
        return self.masks[self.state]

    def accept(self, token: int) -> None:
        """Advance past the token the row picked (always one the mask allowed)."""
        nxt = self.utf8.after[self.state][int(token)]
        self.state = nxt if nxt >= 0 else 0
        if not self.matcher.accept_token(int(token)):
            # Only reachable when the mask left nothing (argmax of all -inf): a schema whose
            # next character would have to be a raw control byte, which JSON forbids.
            raise EngineError(f"the output constraint allowed no token here (token {token} refused; "
                              f"{self.constraint.describe()})")


def mask_logits(logits: torch.Tensor, grammars: Sequence[RowGrammar | None]) -> None:
    """Set, in place, every token a row's grammar forbids to -inf; rows without one are untouched."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[-1])
    for i in rows:
        g = grammars[i]
        g.matcher.fill_next_token_bitmask(bitmask, i)  # type: ignore[union-attr]
        bitmask[i] &= g.extra_mask  # type: ignore[union-attr]
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
