"""Logprobs: the engine's capture where it samples, prompt logprobs through the scoring
forward, and the server's OpenAI shapes (`/v1/completions` logprobs + echo as lm-eval sends
them, `/v1/chat/completions` logprobs + top_logprobs), each row under its own route; every
number is checked against a PEFT forward of that route, one request alone."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lorastack.engine.engine import Engine
from lorastack.engine.sampling import Sampling
from lorastack.engine.score import prompt_logprobs
from lorastack.route import BASE_ROUTE, parse_spec
from lorastack.serve.logprobs import groups, token_strings
from lorastack.tasks import get_task
from test_engine import lib_with_adapters, peft_logits  # noqa: F401 - a fixture
from test_serve import client, runtime  # noqa: F401 - a fixture

TOL = 2e-4  # fp32 tiny model: packed/batched forwards vs PEFT differ by float rounding only


def reference(tiny_base, lib, route, ids: list[int]) -> torch.Tensor:
    """log_softmax of a PEFT forward of `ids` under `route`: row t predicts token t+1."""
    return torch.log_softmax(peft_logits(tiny_base, lib, route, ids), -1)


def test_engine_records_generated_logprobs_per_row_in_a_mixed_batch(tiny_base, lib_with_adapters):
    lib = lib_with_adapters
    engine = Engine(tiny_base, resolve=lib.get)
    routes = [BASE_ROUTE, parse_spec("a"), parse_spec("b"), parse_spec("a:0.7+d:0.3")]
    prompt = tiny_base.chat_ids([{"role": "user", "content": "Sort these words alphabetically: pear fig apple"}])
    reqs = [engine.submit_ids(prompt, r, Sampling(max_tokens=6, logprobs=3, ignore_eos=True)) for r in routes]
    plain = engine.submit_ids(prompt, routes[1], Sampling(max_tokens=6, ignore_eos=True))
    while not all(r.done for r in [*reqs, plain]):
        engine.step()
    assert plain.logprobs == [] and plain.tokens == reqs[1].tokens  # not asked: nothing recorded, same tokens
    outs = {str(r.route): r.tokens for r in reqs}
    assert len(set(map(tuple, outs.values()))) > 1, "the routes should answer differently on this prompt"
    for req, route in zip(reqs, routes):
        ref = reference(tiny_base, lib, route, prompt + req.tokens)
        assert [e.token for e in req.logprobs] == req.tokens
        for j, e in enumerate(req.logprobs):
            row = ref[len(prompt) - 1 + j]
            assert abs(e.logprob - row[e.token].item()) < TOL, (route, j)
            assert [t for t, _ in e.top] == row.topk(3).indices.tolist()
            assert e.top[0][0] == e.token  # greedy: the chosen token is the most likely one


def test_sampled_rows_report_the_raw_distribution_not_the_tempered_one(tiny_base, lib_with_adapters):
    engine = Engine(tiny_base, resolve=lib_with_adapters.get)
    prompt = tiny_base.chat_ids([{"role": "user", "content": "hello there"}])
    req = engine.submit_ids(prompt, BASE_ROUTE, Sampling(max_tokens=4, temperature=1.7, seed=3, logprobs=0, ignore_eos=True))
    while not req.done:
        engine.step()
    ref = reference(tiny_base, lib_with_adapters, BASE_ROUTE, prompt + req.tokens)
    for j, e in enumerate(req.logprobs):
        assert abs(e.logprob - ref[len(prompt) - 1 + j, e.token].item()) < TOL and e.top == ()


def test_prompt_logprobs_score_each_row_under_its_route(tiny_base, lib_with_adapters):
    lib = lib_with_adapters
    engine = Engine(tiny_base, resolve=lib.get)
    rows = [tiny_base.tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in ["Reverse the order of these words: red green blue", "2031-04-09 in words", "x"]]
    routes = [parse_spec("a"), BASE_ROUTE, parse_spec("b:0.5+c:0.5")]
    out = prompt_logprobs(engine, rows, routes, top=2)
    for ids, route, entries in zip(rows, routes, out):
        assert len(entries) == len(ids) and entries[0] is None
        if len(ids) > 1:
            ref = reference(tiny_base, lib, route, ids)
            got = torch.tensor([e.logprob for e in entries[1:]])
            want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            assert torch.allclose(got, want, atol=TOL), route


def test_token_strings_concatenate_to_the_text(tiny_tokenizer):
    text = "Sort these words: été naïve 日本 pear <|im_end|> fig"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_strings(tiny_tokenizer, ids, skip_special=False)
    assert len(pieces) == len(ids) and "".join(pieces) == tiny_tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert "".join(token_strings(tiny_tokenizer, ids, skip_special=True)) == tiny_tokenizer.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------ the server
def _direct(runtime, spec: str, ids: list[int]) -> torch.Tensor:
    route = parse_spec(spec)
    return reference(runtime.base, runtime.library, route, ids)


def test_lm_eval_style_loglikelihood_request_matches_a_direct_forward(runtime):
    """What lm-eval's local-completions sends for loglikelihood: token ids (context +
    continuation), echo, logprobs=1, max_tokens 1 (and 0, which vLLM also takes)."""
    tok = runtime.base.tokenizer
    ctx = tok("Reverse the order of these words: red green blue\nAnswer:", add_special_tokens=False)["input_ids"]
    cont = tok(" blue green red", add_special_tokens=False)["input_ids"]
    ids = ctx + cont
    with client(runtime) as c:
        for max_tokens in (0, 1):
            r = c.post("/v1/completions", json={"model": "reverse_words", "prompt": [ids], "echo": True, "logprobs": 1,
                                                "max_tokens": max_tokens, "temperature": 0, "seed": 1234})
            assert r.status_code == 200, r.text
            assert r.headers["x-lorastack-route"] == "reverse_words"
            choice = r.json()["choices"][0]
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + max_tokens
            assert "".join(lp["tokens"][: len(ids)]) == choice["text"][: len("".join(lp["tokens"][: len(ids)]))]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            ref = _direct(runtime, "reverse_words", ids)
            want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            assert torch.allclose(torch.tensor(lp["token_logprobs"][1: len(ids)]), want, atol=TOL)
            # lm-eval's own parsing: sum over the continuation, greedy if each token is its row's best
            end = len(ids) if max_tokens == 0 else -1
            total = sum(lp["token_logprobs"][len(ctx): end])
            assert math.isclose(total, want[len(ctx) - 1:].sum().item(), abs_tol=1e-3)
            greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(ctx): end], lp["top_logprobs"][len(ctx): end]))
            assert greedy == bool((ref[len(ctx) - 1: len(ids) - 1].argmax(-1) == torch.tensor(cont)).all())
            if max_tokens == 1:
                gen = choice["logprobs"]["token_logprobs"][-1]
                assert abs(gen - ref[-1].max().item()) < TOL  # greedy next token: the row's best


def test_mixed_routes_in_one_completions_request_each_get_their_own_logprobs(runtime):
    prompts = [get_task("reverse_words").generate(1, "test", seed=1)[0]["prompt"], "Rewrite the date 2031-04-09 in words"]
    with client(runtime) as c:
        r = c.post("/v1/completions", json={"model": "auto:knn", "prompt": prompts, "echo": True, "logprobs": 2,
                                            "max_tokens": 3, "temperature": 0, "false_route": 1.0})
        assert r.status_code == 200, r.text
        body = r.json()
        specs = [info["spec"] for info in body["lorastack"]]
        assert len(set(specs)) == 2, specs  # two routes in one batch, or the test proves nothing
        assert r.headers["x-lorastack-route"] == ",".join(specs)
        tok = runtime.base.tokenizer
        for p, spec, choice in zip(prompts, specs, body["choices"]):
            ids = tok(p, add_special_tokens=False)["input_ids"]
            lp = choice["logprobs"]
            gen = len(lp["tokens"]) - len(ids)
            assert 1 <= gen <= 3
            ref = _direct(runtime, spec, ids)
            want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            assert torch.allclose(torch.tensor(lp["token_logprobs"][1: len(ids)]), want, atol=TOL), spec
            assert abs(lp["token_logprobs"][len(ids)] - ref[-1].max().item()) < TOL
            assert all(len(top) >= 2 for top in lp["top_logprobs"][1:])
            assert lp["text_offset"][len(ids)] == len("".join(lp["tokens"][: len(ids)]))


def test_chat_logprobs_per_request_in_a_mixed_batch(runtime):
    """Concurrent chat requests on different routes decode in one batch; each gets its own
    route's logprobs in OpenAI's chat shape."""
    content = "Reverse the order of these words: red green blue"
    models = ["reverse_words", "date_format", "base", "add_numbers"]
    msgs = [{"role": "user", "content": content}]
    ids = runtime.base.chat_ids(msgs)
    expected = {}
    for model in models:  # the reference tokens: each route alone through the engine
        req = runtime.engine.submit_ids(ids, parse_spec(model), Sampling(max_tokens=5, ignore_eos=True))
        while not req.done:
            runtime.engine.step()
        expected[model] = req.tokens
    with client(runtime) as c:
        def ask(model):
            return c.post("/v1/chat/completions", json={"model": model, "messages": msgs, "temperature": 0, "max_tokens": 5,
                                                        "logprobs": True, "top_logprobs": 2, "ignore_eos": True})
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, models))
        for model, r in zip(models, answers):
            assert r.status_code == 200, r.text
            assert r.headers["x-lorastack-route"] == model
            choice = r.json()["choices"][0]
            content_lp = choice["logprobs"]["content"]
            assert "".join(e["token"] for e in content_lp) == choice["message"]["content"]
            gen = expected[model]
            assert len(content_lp) == len(gen) == 5
            ref = _direct(runtime, model, ids + gen)
            for j, e in enumerate(content_lp):
                row = ref[len(ids) - 1 + j]
                assert abs(e["logprob"] - row.max().item()) < TOL, (model, j)
                assert len(e["top_logprobs"]) == 2 and abs(e["top_logprobs"][0]["logprob"] - e["logprob"]) < 1e-6
                assert bytes(e["bytes"]).decode() == e["token"]


def test_logprob_parameters_are_validated(runtime):
    with client(runtime) as c:
        def post(path, **kw):
            base = {"model": "base", "max_tokens": 2, **({"prompt": "hi"} if "completions" == path else
                                                        {"messages": [{"role": "user", "content": "hi"}]})}
            r = c.post(f"/v1/{path}", json={**base, **kw})
            return r.status_code, r.json().get("error", {}).get("param")
        assert post("completions", logprobs=21) == (422, "logprobs")
        assert post("completions", logprobs=True) == (422, "logprobs")  # an int here, not a flag
        assert post("completions", max_tokens=0) == (400, "max_tokens")  # 0 only with echo
        assert post("completions", logprobs=1, stream=True) == (400, "logprobs")
        assert post("completions", prompt=[10**7]) == (400, "prompt")
        assert post("chat/completions", top_logprobs=2) == (400, "top_logprobs")  # needs logprobs=true
        assert post("chat/completions", logprobs=True, top_logprobs=21) == (422, "top_logprobs")
        assert post("chat/completions", logprobs=True, max_tokens=0) == (422, "max_tokens")
        assert post("chat/completions", logprobs=False)[0] == 200
        r = c.post("/v1/chat/completions", json={"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["choices"][0]["logprobs"] is None


def test_scoring_groups_stay_within_the_prefill_budget():
    rows = [[1] * n for n in (3, 4, 2, 9, 1, 1)]
    assert groups(rows, 8) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert groups([], 8) == [] and groups([[1] * 20], 8) == [range(0, 1)]


def test_generated_logprobs_without_echo_and_the_openai_client_shapes(runtime):
    from openai import OpenAI

    from test_serve import live_server

    with live_server(runtime) as (url, _):
        oa = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        c = oa.completions.create(model="date_format", prompt="Rewrite the date 2031-04-09 in words", max_tokens=4,
                                  temperature=0, logprobs=2, extra_body={"ignore_eos": True})
        lp = c.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens == 4
        assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
        assert all(v <= 0 and len(top) >= 2 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
        chat = oa.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0.8, seed=1, logprobs=True, extra_body={"ignore_eos": True})
        content = chat.choices[0].logprobs.content
        assert len(content) == 3 and all(e.top_logprobs == [] and e.logprob <= 0 for e in content)


def test_logprobs_stop_where_a_stop_string_cuts_the_text(runtime):
    body = {"model": "reverse_words", "prompt": "Reverse the order of these words: red green blue", "max_tokens": 12,
            "temperature": 0, "logprobs": 0, "ignore_eos": True}
    with client(runtime) as c:
        full = c.post("/v1/completions", json=body).json()["choices"][0]
        text = full["text"]
        assert "".join(full["logprobs"]["tokens"]) == text and len(full["logprobs"]["tokens"]) == 12
        stop = text[len(text) // 2: len(text) // 2 + 2]
        cut = c.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
        chat = c.post("/v1/chat/completions", json={**{k: v for k, v in body.items() if k not in ("prompt", "logprobs")},
                                                    "messages": [{"role": "user", "content": body["prompt"]}],
                                                    "logprobs": True, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"
    tokens = cut["logprobs"]["tokens"]
    assert len(tokens) < 12 and "".join(tokens).startswith(cut["text"]) and "".join(tokens[:-1]) in cut["text"]
    assert cut["logprobs"]["token_logprobs"] == full["logprobs"]["token_logprobs"][: len(tokens)]
    pieces = [e["token"] for e in chat["logprobs"]["content"]]
    assert "".join(pieces).startswith(chat["message"]["content"]) and "".join(pieces[:-1]) in chat["message"]["content"]


@pytest.mark.integration
def test_echo_logprobs_on_the_embedded_base_match_transformers(tmp_path):
    """The real SmolLM2 in float32: an lm-eval loglikelihood request gives transformers' numbers."""
    from lorastack.base import Base
    from lorastack.library import Library
    from lorastack.runtime import Runtime

    base = Base.load("embedded", dtype="float32")
    rt = Runtime(base, Library(tmp_path / "lib"))
    tok = base.tokenizer
    ctx = tok("Question: What is the capital of France?\nAnswer:", add_special_tokens=False)["input_ids"]
    ids = ctx + tok(" Paris", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(base.model(torch.tensor([ids])).logits[0].float(), -1)
    with client(rt) as c:
        lp = c.post("/v1/completions", json={"model": "base", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
                                             "temperature": 0}).json()["choices"][0]["logprobs"]
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1: len(ids)]), want, atol=1e-4)
    assert abs(lp["token_logprobs"][-1] - ref[-1].max().item()) < 1e-4
