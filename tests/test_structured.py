"""Structured output: JSON mode, JSON schemas and forced function calls by constrained decoding.

The tiny model is random, so whatever it produces unconstrained is noise; under a constraint
every finished output must still parse and validate — that is what the mask guarantees.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from lorastack.engine.constrain import Constraint, Grammars, SchemaError, check_schema, mask_logits
from lorastack.engine.engine import Engine
from lorastack.engine.sampling import Sampling
from lorastack.errors import LorastackError
from lorastack.route import BASE_ROUTE, parse_spec
from test_engine import lib_with_adapters  # noqa: F401 - fixture
from test_serve import client, live_server, runtime  # noqa: F401 - fixtures

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"]}
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "shades": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                                                     "maxItems": 2}},
         "required": ["color", "shades"], "additionalProperties": False}
# One schema per supported keyword family; each is bounded so a random walk ends.
SCHEMAS = {
    "enum_const": {"type": "object", "properties": {"c": {"enum": ["red", 3, None]}, "k": {"const": "x"}}, "required": ["c", "k"]},
    "string_bounds": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}}, "required": ["s"]},
    "pattern": {"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-c]{2,4}$"}}, "required": ["s"]},
    "numbers": {"type": "object", "properties": {"i": {"type": "integer", "minimum": -3, "maximum": 12},
                                                 "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
                "required": ["i", "x"]},
    "arrays": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "boolean"}], "items": False},
    "items_bounds": {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                                            "minItems": 1, "maxItems": 3}}, "required": ["a"]},
    "any_of": {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "null"}]}},
               "required": ["v"]},
    "type_list": {"type": "object", "properties": {"t": {"type": ["string", "null"], "maxLength": 2}}, "required": ["t"]},
    "refs": {"$defs": {"P": {"type": "object", "properties": {"n": {"type": "string", "maxLength": 3}}, "required": ["n"]}},
             "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}, "q": {"type": "array", "items": {"$ref": "#/$defs/P"}, "maxItems": 2}},
             "required": ["p", "q"]},
    "additional": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3}},
                   "additionalProperties": {"type": "boolean"}},
    "optional": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3}, "b": {"type": "boolean"}},
                 "required": ["b"]},
    "person": PERSON,
}
USER = [{"role": "user", "content": "Describe a person as JSON"}]


def check(text: str, schema: dict | None) -> None:
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict), text
    else:
        jsonschema.validate(value, schema)


# ------------------------------------------------------------------ the schema subset
@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "uniqueItems": True}, "'uniqueItems' at #"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 3}}}, "'multipleOf' at #/properties/a"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "'not' at #/properties/a"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "'oneOf' at #"),
    ({"type": "string", "format": "email"}, "'format' at #"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties' at #"),
])
def test_unsupported_schema_keywords_are_named(schema, named):
    with pytest.raises(SchemaError) as e:
        check_schema(schema)
    assert named in str(e.value)


@pytest.mark.parametrize("schema, needle", [
    ([1], "must be an object"), ({"type": "strin"}, "type must be one of"), ({"$ref": "http://x/y.json"}, "local references"),
    ({"enum": []}, "non-empty"), ({"type": "string", "pattern": "[a-z]{1,5000}"}, "repetitions"),
    ({"type": "string", "pattern": "(a{1,100}){1,100}"}, "repetitions"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,300}"} for i in range(8)}}, "summed"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}}, "at most 256 per object"),
    ({"type": "array", "prefixItems": [{"type": "object", "properties": {f"p{i}": {} for i in range(200)}}] * 3}, "subschemas"),
])
def test_malformed_schemas_are_refused(schema, needle):
    with pytest.raises(SchemaError, match=needle):
        check_schema(schema)


def test_sampling_refuses_stop_and_ignore_eos_with_a_constraint():
    with pytest.raises(LorastackError, match="stop"):
        Sampling(stop=("}",), constraint=Constraint.json_object())
    with pytest.raises(LorastackError, match="ignore_eos"):
        Sampling(ignore_eos=True, constraint=Constraint.json_object())


# ------------------------------------------------------------------ the mask itself
@pytest.mark.parametrize("name", [None, *SCHEMAS])
def test_every_path_the_mask_allows_is_valid_json(tiny_tokenizer, name):
    """Random walks over the allowed tokens (any output the constraint permits, not just what
    one model prefers) end in JSON that parses and validates."""
    schema = SCHEMAS.get(name)
    vocab = len(tiny_tokenizer)
    grammars = Grammars(tiny_tokenizer, vocab, tiny_tokenizer.eos_token_id)
    c = Constraint.json_object() if schema is None else Constraint.json_schema(schema)
    rng, finished = random.Random(0), 0
    for _ in range(25):
        g, ids = grammars.matcher(c), []
        for _ in range(150):
            logits = torch.zeros(1, vocab)
            mask_logits(logits, [g])
            allowed = torch.nonzero(logits[0] == 0).flatten().tolist()
            assert allowed, "the mask left no token"
            eos = tiny_tokenizer.eos_token_id in allowed and rng.random() < 0.5
            tok = tiny_tokenizer.eos_token_id if eos else rng.choice(allowed)
            g.accept(tok)
            if tok == tiny_tokenizer.eos_token_id:
                check(tiny_tokenizer.decode(ids), schema)
                finished += 1
                break
            ids.append(tok)
    assert finished >= 10, f"only {finished} of 25 walks ended"


# ------------------------------------------------------------------ the engine
@pytest.mark.parametrize("schema", [None, PERSON, COLOR], ids=["json_object", "person", "color"])
def test_random_model_output_is_valid_under_the_constraint(tiny_base, schema):
    engine = Engine(tiny_base)
    c = Constraint.json_object() if schema is None else Constraint.json_schema(schema)
    stopped = 0
    for seed in [None, 0, 1, 2, 3, 4, 5]:
        s = Sampling(max_tokens=80, temperature=0.0 if seed is None else 1.0, seed=seed, constraint=c)
        g = engine.generate([USER], BASE_ROUTE, s)[0]
        if g.finish_reason == "stop":
            check(g.text, schema)
            stopped += 1
        else:
            assert g.finish_reason == "length" and g.completion_tokens == 80
    # Bounded schemas always end; free JSON objects from a random model end sometimes.
    assert stopped == 7 if schema is not None else stopped >= 1
    # Unconstrained, the same model does not produce JSON: the mask is doing the work.
    raw = engine.generate([USER], BASE_ROUTE, Sampling(max_tokens=40, temperature=1.0, seed=0))[0].text
    with pytest.raises(ValueError):
        check(raw, schema)


def test_mixed_batch_rows_equal_their_solo_runs(tiny_base, lib_with_adapters):  # noqa: F811
    """Constrained (two schemas, JSON mode) and unconstrained rows, base and adapter routes, in
    one engine step: each row's tokens equal its run alone."""
    engine = Engine(tiny_base, resolve=lib_with_adapters.get)
    rows = [(None, BASE_ROUTE, None), (Constraint.json_schema(PERSON), BASE_ROUTE, None),
            (Constraint.json_schema(COLOR), parse_spec("a"), 3), (Constraint.json_object(), parse_spec("b"), 1),
            (None, parse_spec("a"), 2), (Constraint.json_schema(PERSON), parse_spec("c"), 7)]

    def sampling(c, seed):
        return Sampling(max_tokens=40, temperature=0.0 if seed is None else 1.0, seed=seed, constraint=c)

    prompt = tiny_base.chat_ids(USER)
    solo = []
    for c, route, seed in rows:
        req = engine.submit_ids(prompt, route, sampling(c, seed))
        while not req.done:
            engine.step()
        solo.append(req.tokens)
    prefills, steps = engine.stats["prefills"], engine.stats["steps"]
    reqs = [engine.submit_ids(prompt, route, sampling(c, seed)) for c, route, seed in rows]
    widest = 0
    while not all(r.done for r in reqs):
        engine.step()
        widest = max(widest, len(engine.running))
    assert engine.stats["prefills"] == prefills + 1 and engine.stats["steps"] > steps
    assert widest == len(rows) - sum(len(t) == 1 for t in solo), "every row decoded in the same steps"
    for (c, route, _), req, alone in zip(rows, reqs, solo):
        assert req.error is None
        assert req.tokens == alone, (c, str(route))
        if c is not None and req.finish_reason == "stop":
            check(req.text, None if c.schema is None else json.loads(c.schema))
    assert sum(r.finish_reason == "stop" and r._grammar is not None for r in reqs) >= 3


# ------------------------------------------------------------------ the server
def chat(model: str = "base", **kw) -> dict:
    return {"model": model, "messages": USER, "max_tokens": 60, "temperature": 0, **kw}


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def test_server_response_format_json_object_and_schema(runtime):  # noqa: F811
    with client(runtime) as c:
        for seed in range(3):
            r = c.post("/v1/chat/completions", json=chat(response_format=json_schema_format(PERSON), temperature=1.0, seed=seed))
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "stop"
            check(choice["message"]["content"], PERSON)
        r = c.post("/v1/chat/completions", json=chat(model="reverse_words", response_format={"type": "json_object"}, n=3,
                                                     temperature=1.0, seed=4, max_tokens=40))
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            if choice["finish_reason"] == "stop":
                check(choice["message"]["content"], None)
        # Cut by max_tokens: "length", as OpenAI reports it.
        r = c.post("/v1/chat/completions", json=chat(response_format=json_schema_format(PERSON), max_tokens=3))
        assert r.json()["choices"][0]["finish_reason"] == "length"
        # /v1/completions takes the same response_format.
        r = c.post("/v1/completions", json={"model": "base", "prompt": "JSON:", "max_tokens": 60, "temperature": 0,
                                            "response_format": json_schema_format(COLOR)})
        assert r.status_code == 200, r.text
        check(r.json()["choices"][0]["text"], COLOR)
        # Streaming a constrained reply: the pieces add up to valid JSON.
        with c.stream("POST", "/v1/chat/completions", json=chat(response_format=json_schema_format(COLOR), stream=True)) as s:
            lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
        check("".join(ch["choices"][0]["delta"].get("content", "") for ch in lines), COLOR)


@pytest.mark.parametrize("extra, param, needle", [
    ({"response_format": json_schema_format({"type": "array", "uniqueItems": True})}, "response_format", "uniqueItems"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'yaml'"),
    ({"model": "stack/any", "response_format": {"type": "json_object"}, "max_tokens": None}, "response_format", "stack/"),
    ({"response_format": json_schema_format({"type": "string", "pattern": "(["})}, "response_format", "cannot compile"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, None, "stop"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "no tool_choice (with tools, that means 'auto')"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool_choice", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice", "'g'"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools", "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}],
      "tool_choice": "required"}, "tools", "'not'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "stream": True}, "stream", "stream"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format", "not both"),
])
def test_server_refuses_what_it_cannot_enforce(runtime, extra, param, needle):  # noqa: F811
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json=chat(**extra))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and needle in r.json()["error"]["message"], r.text


def test_completions_refuse_tools(runtime):  # noqa: F811
    with client(runtime) as c:
        r = c.post("/v1/completions", json={"model": "base", "prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}],
                                            "tool_choice": "required"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


def test_forced_tool_call_and_tool_messages(runtime):  # noqa: F811
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}
    tools = [{"type": "function", "function": {"name": "forecast", "description": "weather forecast", "parameters": params}},
             {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json={"model": "base", "messages": messages, "tools": tools, "max_tokens": 60,
                                                 "tool_choice": {"type": "function", "function": {"name": "forecast"}}})
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        assert msg["content"] is None and len(msg["tool_calls"]) == 1
        call = msg["tool_calls"][0]
        assert call["type"] == "function" and call["function"]["name"] == "forecast" and call["id"].startswith("call_")
        check(call["function"]["arguments"], params)
        # tool_choice "none": a plain reply, no tool call.
        r = c.post("/v1/chat/completions", json={"model": "base", "messages": messages, "tools": tools, "tool_choice": "none",
                                                 "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] is None
        # The conversation goes on with the call and its result; both reach the prompt.
        follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21C"}]
        r = c.post("/v1/chat/completions", json={"model": "base", "messages": follow, "max_tokens": 4})
        assert r.status_code == 200, r.text
        rendered = runtime.base.chat_ids(messages + [
            {"role": "assistant", "content": json.dumps([call["function"]])}, {"role": "tool", "content": "sunny, 21C"}])
        assert r.json()["usage"]["prompt_tokens"] == len(rendered)


# ------------------------------------------------------------------ third-party client
def test_langchain_with_structured_output(runtime):  # noqa: F811
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        """A person."""

        name: str = Field(max_length=8, description="first name")
        age: int = Field(ge=0, le=120)
        member: bool

    with live_server(runtime) as (url, _):
        llm = ChatOpenAI(base_url=url + "/v1", api_key="none", model="base", temperature=0, max_tokens=60, max_retries=0)
        for method in ("json_schema", "function_calling"):  # response_format / a forced tool call
            out = llm.with_structured_output(Person, method=method).invoke("Make up a person.")
            assert isinstance(out, Person), (method, out)  # LangChain parsed and validated it
        many = llm.with_structured_output(Person).batch(["A person.", "Another person."])
        assert all(isinstance(p, Person) for p in many)
        from openai import OpenAI

        parsed = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).chat.completions.parse(
            model="base", messages=[{"role": "user", "content": "A person."}], response_format=Person, max_tokens=60, temperature=0)
        assert isinstance(parsed.choices[0].message.parsed, Person)


# ------------------------------------------------------------------ the CLI
def test_cli_generate_json_schema(tiny_base_dir, tmp_path):
    from test_cli import run

    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    common = ["--base", str(tiny_base_dir), "--library", str(tmp_path / "lib")]
    r = run(*common, "generate", "A person as JSON", "--json-schema", str(schema_file), "--max-tokens", "80")
    assert r.returncode == 0, r.stderr
    check(r.stdout.strip(), PERSON)
    schema_file.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    r = run(*common, "generate", "x", "--json-schema", str(schema_file))
    assert r.returncode != 0 and "uniqueItems" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------ the real base
@pytest.mark.integration
def test_embedded_base_fills_a_schema_from_the_prompt():
    """On SmolLM2 the constraint gives the shape; the model still supplies the content."""
    from lorastack.base import Base

    engine = Engine(Base.load("embedded"))
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 14}},
              "required": ["city", "days"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Extract the city and the number of days as JSON: "
                                       "I want the weather forecast for Paris for the next 3 days."}]
    free = engine.submit(ask, BASE_ROUTE, Sampling(max_tokens=48))
    constrained = engine.submit(ask, BASE_ROUTE, Sampling(max_tokens=48, constraint=Constraint.json_schema(schema)))
    while not (free.done and constrained.done):
        engine.step()
    assert constrained.finish_reason == "stop", constrained.text
    value = json.loads(constrained.text)
    jsonschema.validate(value, schema)
    assert value["city"] == "Paris" and value["days"] == 3, (constrained.text, free.text)


def test_speculative_drafts_respect_the_constraint(tiny_base):
    """Prompt-lookup drafts (greedy rows) are verified through the same masked pick, so a
    constrained greedy row decodes the same tokens with and without speculation."""
    example = '{"name": "ab", "ok": false, "n": 12} {"name": "abc", "ok": true, "n": 7}'
    ask = [{"role": "user", "content": f"Like these: {example} {example}"}]
    outputs = []
    for speculate in (0, 7):
        engine = Engine(tiny_base, speculate=speculate)
        reqs = [engine.submit(ask, BASE_ROUTE, Sampling(max_tokens=60, constraint=c))
                for c in (Constraint.json_schema(PERSON), Constraint.json_object(), None)]
        while not all(r.done for r in reqs):
            engine.step()
        outputs.append([r.tokens for r in reqs])
        if speculate:
            assert engine.stats["drafted"] > 0, "the prompt gave the lookup something to draft"
    assert outputs[0] == outputs[1]
    check(tiny_base.tokenizer.decode(outputs[1][0]), PERSON)


def test_constrained_bytes_stay_valid_utf8_across_tokens():
    """xgrammar matches bytes and let a random model write UTF-16 surrogate bytes (ED A4 AB) in a
    string, three U+FFFD once decoded; the extra mask follows UTF-8 across token boundaries:
    a character split over tokens is fine, a surrogate, an overlong form or a stray byte is not."""
    from lorastack.engine.constrain import _Utf8

    vocab = [b'"', b"a", b"\xe4", b"\xb8", b"\xad", b"\xe4\xb8", b"\xed", b"\xa4\xab", b"\x9f\xbf", b"\xc0\x80", b"\xb8\xad"]
    u = _Utf8(vocab)

    def walk(ids):
        state = 0
        for t in ids:
            state = u.after[state][t]
            if state < 0:
                return False
        return state == 0

    assert walk([0, 1, 2, 3, 4, 0]) and walk([5, 4]) and walk([2, 10])  # 中 as 3, 2 or 1+2 tokens
    assert not walk([6, 7]) and walk([6, 8])  # ED A4 AB is a surrogate; ED 9F BF is U+D7FF
    assert not walk([9]) and not walk([3]) and not walk([2, 0])  # overlong, stray continuation, cut short
