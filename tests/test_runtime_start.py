"""`Runtime.start`, the one execution path: fixed routes, `auto` and stacks give the same
kind of handle; the server, CLI and evaluation agree with it; cancelling a stack stops it."""

from __future__ import annotations

import httpx
import pytest

from lorastack.engine.sampling import Sampling
from lorastack.eval import evaluate
from lorastack.library import Library
from lorastack.route import Route, parse_spec
from lorastack.runtime import Runtime
from lorastack.serve import ServeSettings, create_app
from lorastack.serve.background import running
from lorastack.stacks import StackStore, parse_stack
from test_library import make_peft_adapter

STACK = {"name": "two-step", "stages": [
    {"name": "first", "prompt": "What is the value of \"born\" in {input}?", "model": "json_field", "max_tokens": 6},
    {"name": "second", "prompt": "Rewrite the date {stages.first.output} in words", "model": "date_format", "max_tokens": 6}]}
RECORD = '{"born": "2001-02-03"}'


@pytest.fixture()
def runtime(tiny_base, tmp_path) -> Runtime:
    lib = Library(tmp_path / "lib")
    for i, name in enumerate(("json_field", "date_format")):
        lib.add(make_peft_adapter(tiny_base, tmp_path / "src" / name, seed=i), name, base=tiny_base)
    StackStore(lib.root).add(parse_stack(STACK))
    return Runtime(tiny_base, lib, max_batch=16)


def test_routes_auto_and_stacks_share_one_handle_shape(runtime):
    greedy = Sampling(max_tokens=6)
    direct = runtime.generator.generate([[{"role": "user", "content": RECORD}]], parse_spec("json_field"), greedy)[0].text
    handles = {spec: runtime.start(spec, RECORD, greedy) for spec in ("json_field", "auto", "stack/two-step", "base")}
    assert handles["json_field"].result().text == direct
    assert handles["json_field"].decision.route == parse_spec("json_field") and handles["json_field"].trace is None
    assert handles["auto"].decision is not None  # routed, with what it was decided on
    stack = handles["stack/two-step"]
    result = stack.result()
    assert [t.stage for t in stack.trace] == ["first", "second"] and stack.model == "stack/two-step"
    assert result.text == stack.trace[-1].output and result.completion_tokens == sum(t.completion_tokens for t in stack.trace)
    # A conversation reaches a stack as its last user message; streamed pieces add up to the answer.
    again = runtime.start("stack/two-step", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                             {"role": "user", "content": RECORD}])
    assert "".join(again.stream()) == result.text


def test_cancelling_a_stack_stops_its_running_stage_and_starts_no_more(runtime):
    slow = dict(STACK, name="slow", stages=[dict(s, max_tokens=200) for s in STACK["stages"]])
    handle = runtime.start(parse_stack(slow), RECORD, Sampling())
    while not handle.ex.inflight and not handle.done:  # wait until the first stage is decoding
        handle.wait(0.01)
    handle.cancel()
    assert handle.wait(30)
    assert handle.error is not None and "cancelled" in str(handle.error)
    assert [t.stage for t in handle.trace] == ["first"]  # the second stage never started
    assert runtime.generator.running == [] or all(r.cancelled for r in runtime.generator.running)


def test_evaluate_takes_specs_routes_and_stacks_through_start(runtime):
    records = [{"prompt": RECORD, "completion": "x"}, {"prompt": '{"born": "1999-12-31"}', "completion": "y"}]
    fixed = evaluate(runtime, "json_field", records, progress=False)
    routed = evaluate(runtime, [Route((("json_field", 1.0),))] * 2, records, progress=False)
    assert [r["output"] for r in fixed.rows] == [r["output"] for r in routed.rows]
    stacked = evaluate(runtime, "stack/two-step", records, progress=False, stop_early=False)
    assert all(r["route"] == "stack/two-step" and [t["stage"] for t in r["trace"]] == ["first", "second"] for r in stacked.rows)


def test_stacks_in_the_completions_endpoint_with_n_and_a_trace(runtime):
    with running(create_app(runtime, ServeSettings())) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "stack/two-step", "prompt": RECORD, "n": 2}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["choices"]) == 2 and body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy stages
        assert [t["stage"] for t in body["lorastack"][0]["trace"]] == ["first", "second"]
        assert body["usage"]["completion_tokens"] > 0
        r = httpx.post(url + "/v1/completions", json={"model": "stack/nope", "prompt": RECORD}, timeout=60)
        assert r.status_code == 404
