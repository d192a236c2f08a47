"""The HTTP server against the real ASGI app on the tiny base: the official openai client on a
live loopback server, hot load/unload, auth, limits, disconnects, a bounded load test and a
schema fuzz run."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from lorastack.engine.sampling import Sampling
from lorastack.library import Library
from lorastack.route import Route
from lorastack.runtime import Runtime
from lorastack.serve import ServeSettings, create_app
from lorastack.serve.background import running
from lorastack.tasks import get_task
from test_library import make_peft_adapter

TASKS = ["reverse_words", "date_format", "add_numbers"]


@pytest.fixture()
def runtime(tiny_base, tmp_path) -> Runtime:
    lib = Library(tmp_path / "lib")
    for i, t in enumerate(TASKS):
        src = make_peft_adapter(tiny_base, tmp_path / "src" / t, seed=i)
        lib.add(src, t, base=tiny_base, examples=[r["prompt"] for r in get_task(t).generate(24, "train", seed=0)])
    return Runtime(tiny_base, lib, max_batch=16, max_resident=4)


@contextmanager
def client(runtime: Runtime, **settings):
    app = create_app(runtime, ServeSettings(**settings))
    with TestClient(app) as c:
        yield c


@contextmanager
def live_server(runtime: Runtime, **settings):
    """uvicorn on a free loopback port, in a thread; stopped at the end of the block."""
    app = create_app(runtime, ServeSettings(**settings))
    with running(app) as url:
        yield url, app


def chat_body(model: str, content: str = "Reverse the order of these words: red green blue", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 12, **kw}


# ------------------------------------------------------------------ the official client
def test_openai_client_chat_completions_streaming_and_models(runtime):
    from openai import OpenAI

    prompt = "Reverse the order of these words: red green blue"
    expected = runtime.engine.generate([[{"role": "user", "content": prompt}]], Route((("reverse_words", 1.0),)),
                                       Sampling(max_tokens=12))[0]
    with live_server(runtime, api_key="sekrit") as (url, _):
        oa = OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        models = {m.id: m for m in oa.models.list().data}
        assert {"base", "auto", "auto:knn", *TASKS} <= set(models)
        assert models["reverse_words"].to_dict()["parent"] == "base"

        r = oa.chat.completions.create(model="reverse_words", messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=12)
        assert r.choices[0].message.content == expected.text
        assert r.usage.prompt_tokens == expected.prompt_tokens
        assert r.usage.completion_tokens == expected.completion_tokens
        assert r.to_dict()["lorastack"]["route"] == [{"adapter": "reverse_words", "weight": 1.0}]

        pieces, finish, extra = [], None, None
        for chunk in oa.chat.completions.create(model="reverse_words", messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}):
            extra = extra or chunk.to_dict().get("lorastack")
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                assert chunk.usage.completion_tokens == expected.completion_tokens
        assert "".join(pieces) == expected.text
        assert finish == expected.finish_reason
        assert extra["spec"] == "reverse_words"

        # auto: the router's choice is reported; a date prompt should go to the date adapter.
        date_prompt = get_task("date_format").generate(1, "test", seed=3)[0]["prompt"]
        r = oa.chat.completions.create(model="auto", messages=[{"role": "user", "content": date_prompt}], temperature=0, max_tokens=4)
        info = r.to_dict()["lorastack"]
        assert info["router"] == "learned" and info["threshold"] is not None and info["candidate"] in TASKS, info
        # The per-request operating point (an extra body field): the loosest one routes it.
        r = oa.chat.completions.create(model="auto:knn", messages=[{"role": "user", "content": "Rewrite the date 2031-04-09 in words"}],
                                       temperature=0, max_tokens=4, extra_body={"false_route": 1.0})
        info = r.to_dict()["lorastack"]
        assert info["router"] == "knn" and info["spec"] == "date_format", info
        assert info["confidence"] >= info["threshold"] and info["signal"] == "examples"

        # A mixture by the model field, and plain completions.
        r = oa.chat.completions.create(model="reverse_words:0.5+date_format:0.5", messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=4)
        assert [e["adapter"] for e in r.to_dict()["lorastack"]["route"]] == ["reverse_words", "date_format"]
        c = oa.completions.create(model="base", prompt="hello", max_tokens=5, temperature=0)
        assert c.object == "text_completion" and 1 <= c.usage.completion_tokens <= 5

        import openai

        with pytest.raises(openai.NotFoundError) as e:
            oa.chat.completions.create(model="reverse_word", messages=[{"role": "user", "content": "x"}])
        assert "reverse_words" in str(e.value)
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_completions_match_the_engine(runtime):
    tok = runtime.base.tokenizer
    ids = tok("Reverse the order", add_special_tokens=False)["input_ids"]
    ref = runtime.engine.submit_ids(ids, Route((("date_format", 1.0),)), Sampling(max_tokens=6))
    while not ref.done:
        runtime.engine.step()
    with client(runtime) as c:
        r = c.post("/v1/completions", json={"model": "date_format", "prompt": "Reverse the order", "max_tokens": 6,
                                            "temperature": 0, "echo": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == "Reverse the order" + ref.result().text
        assert body["usage"]["prompt_tokens"] == len(ids)
        two = c.post("/v1/completions", json={"model": "base", "prompt": ["a b", "c d"], "max_tokens": 3, "temperature": 0})
        assert [ch["index"] for ch in two.json()["choices"]] == [0, 1]


# ------------------------------------------------------------------ security and limits
def test_auth_errors_and_limits(runtime):
    with client(runtime, api_key="k1", max_tokens_cap=32, max_body_bytes=4096) as c:
        ok = {"Authorization": "Bearer k1"}
        assert c.get("/health").status_code == 200  # health stays open for load balancers
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "k1"}).status_code == 200

        r = c.post("/v1/chat/completions", json=chat_body("reverse_words", max_tokens=33), headers=ok)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = c.post("/v1/chat/completions", json=chat_body("reverse_words", n=9), headers=ok)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = c.post("/v1/chat/completions", json=chat_body("reverse_words", n=2, stream=True), headers=ok)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = c.post("/v1/chat/completions", content=b"{not json", headers={**ok, "Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"] and "at character 1" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", headers=ok)
        assert r.status_code == 400 and r.json()["error"]["param"] == "body"
        r = c.post("/v1/chat/completions", json={"model": "base"}, headers=ok)
        assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/chat/completions", json=chat_body("base", temperature=-1), headers=ok)
        assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
        r = c.post("/v1/chat/completions", json=chat_body("date_formt"), headers=ok)
        assert r.status_code == 404 and "date_format" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/chat/completions", json=chat_body("a:x+b"), headers=ok)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = c.post("/v1/chat/completions", json=chat_body("base", content="x" * 5000), headers=ok)
        assert r.status_code == 413
        r = c.post("/v1/chat/completions", json=chat_body("base", content="word " * 600), headers=ok)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "the base's context of 256 tokens" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", content=json.dumps(chat_body("base", temperature=float("nan"))),  # NaN: JSON5-ish, Python's json reads it
                   headers={**ok, "Content-Type": "application/json"})
        assert r.status_code == 422 and "finite number" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", content=json.dumps(chat_body("base", content="a \ud800 b")),  # sent as the escape \\ud800
                   headers={**ok, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
        assert "not valid Unicode text" in r.json()["error"]["message"]
        image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
        r = c.post("/v1/chat/completions", json={**chat_body("base"), "messages": [{"role": "user", "content": image}]}, headers=ok)
        err = r.json()["error"]
        assert r.status_code == 422 and err["param"] == "messages.0" and "content[1] is a 'image_url' part" in err["message"], r.text
        assert "more problem" not in err["message"]  # one message naming it, not a union's three
        parts = [{"type": "text", "text": "Reverse "}, {"type": "text", "text": "a b"}]
        r = c.post("/v1/chat/completions", json={**chat_body("base"), "messages": [{"role": "user", "content": parts}]}, headers=ok)
        assert r.status_code == 200, r.text  # text parts still work
    with client(runtime, max_prompt_tokens=20) as c:  # the server's own cap, named as such
        r = c.post("/v1/chat/completions", json=chat_body("base", content="word " * 30))
        assert r.status_code == 400 and "this server accepts at most 20 prompt tokens" in r.json()["error"]["message"]
        assert c.get("/v1/nope", headers=ok).status_code == 404


def test_full_queue_answers_429_with_retry_after(runtime):
    runtime.engine.max_batch = 1
    with client(runtime, max_queue=2) as c:
        busy = [runtime.engine.submit("hold", Route(), Sampling(max_tokens=200, ignore_eos=True)) for _ in range(4)]
        r = c.post("/v1/chat/completions", json=chat_body("base"))
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
        for b in busy:
            b.cancel()
        deadline = time.monotonic() + 20
        while runtime.engine.queue_depth or runtime.engine.running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.post("/v1/chat/completions", json=chat_body("base")).status_code == 200
        assert 'lorastack_rejected_total{reason="queue_full"} 1.0' in c.get("/metrics").text


# ------------------------------------------------------------------ adapters at run time
def test_hot_import_delete_and_vllm_load_unload(runtime, tiny_base, tmp_path):
    root = tmp_path / "imports"
    fresh = make_peft_adapter(tiny_base, root / "fresh", seed=7)
    outside = make_peft_adapter(tiny_base, tmp_path / "elsewhere", seed=8)
    with client(runtime, import_roots=(root,)) as c:
        # vLLM-style unload: not listed, not served, never routed to; load brings it back.
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "date_format"})
        assert r.status_code == 200 and "removed" in r.text
        assert "date_format" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert c.post("/v1/chat/completions", json=chat_body("date_format")).status_code == 404
        # One of date_format's own stored examples: routed to it whenever it is routable at all
        # (the random tiny base places other date requests wherever it happens to). Before any
        # example-less adapter is imported: at false_route 1.0 its Arrow signal may take anything.
        date_prompt = get_task("date_format").generate(24, "train", seed=0)[0]["prompt"]
        r = c.post("/v1/chat/completions", json=chat_body("auto:knn", content=date_prompt, false_route=1.0))
        assert "date_format" not in r.json()["lorastack"]["spec"]
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "date_format"}).status_code == 200
        r = c.post("/v1/chat/completions", json=chat_body("auto:knn", content=date_prompt, false_route=1.0))
        assert r.json()["lorastack"]["spec"] == "date_format", json.dumps(r.json()["lorastack"])
        assert c.post("/v1/chat/completions", json=chat_body("fresh")).status_code == 404
        r = c.post("/v1/adapters", json={"path": str(fresh), "name": "fresh"})
        assert r.status_code == 201, r.text
        assert r.json()["card"]["base_fingerprint"] == tiny_base.fingerprint
        assert "fresh" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert c.post("/v1/chat/completions", json=chat_body("fresh")).status_code == 200
        assert c.post("/v1/adapters", json={"path": str(fresh), "name": "fresh"}).status_code == 409
        r = c.post("/v1/adapters", json={"path": str(outside), "name": "outside"})
        assert r.status_code == 403 and "import roots" in r.json()["error"]["message"]
        r = c.post("/v1/adapters", json={"path": str(root / ".." / "elsewhere"), "name": "sneaky"})
        assert r.status_code == 403
        r = c.post("/v1/adapters", json={"path": str(fresh), "name": "../evil"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"

        r = c.post("/v1/load_lora_adapter", json={"lora_name": "viaload", "lora_path": str(fresh)})
        assert r.status_code == 200 and "viaload" in runtime.library

        assert c.delete("/v1/adapters/fresh").status_code == 200
        assert c.post("/v1/chat/completions", json=chat_body("fresh")).status_code == 404
        assert c.delete("/v1/adapters/fresh").status_code == 404


def test_removing_an_adapter_does_not_disturb_its_requests_in_flight(runtime):
    route = Route((("reverse_words", 1.0),))
    want = runtime.engine.generate([[{"role": "user", "content": "keep going"}]], route,
                                   Sampling(max_tokens=120, ignore_eos=True))[0].text
    with client(runtime) as c:
        req = runtime.engine.submit("keep going", route, Sampling(max_tokens=120, ignore_eos=True))
        while len(req.tokens) < 5:
            time.sleep(0.001)
        assert not req.done, "request finished before the adapter was removed; make it longer"
        assert c.delete("/v1/adapters/reverse_words").status_code == 200
        got = req.result(timeout=60)
        assert got.text == want and got.completion_tokens == 120
        assert c.post("/v1/chat/completions", json=chat_body("reverse_words")).status_code == 404


# ------------------------------------------------------------------ disconnects
def test_client_disconnect_cancels_and_frees_the_row(runtime):
    # Long generations, so the client hangs up mid-way (RoPE has no hard limit on the tiny model).
    runtime.base.model.config.max_position_embeddings = 4096
    engine = runtime.engine
    step = engine.step

    def paced_step():  # >= 5 s for 1000 tokens however fast the machine: the client always hangs up first
        time.sleep(0.005)
        step()

    engine.step = paced_step
    with live_server(runtime) as (url, app):
        # Streaming: read one event, then hang up.
        with httpx.Client(base_url=url, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions", json=chat_body("base", max_tokens=1000, ignore_eos=True, stream=True)) as r:
                assert r.status_code == 200
                next(r.iter_lines())
        # Non-streaming: the client gives up after a short timeout.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=chat_body("base", max_tokens=1000, ignore_eos=True), timeout=2.0)
        deadline = time.monotonic() + 20
        while engine.running or engine.queue_depth:
            assert time.monotonic() < deadline, "disconnected requests were not cancelled"
            time.sleep(0.05)
        metrics = httpx.get(url + "/metrics").text
        assert "lorastack_cancelled_total 2.0" in metrics


# ------------------------------------------------------------------ load, metrics, fuzz
def test_bounded_load_test_mixed_routes(runtime):
    """300 requests, 16 at a time, mixed adapters, mixtures and `auto`: zero errors."""
    models = TASKS + ["base", "auto", "reverse_words:0.6+add_numbers:0.4"]
    prompts = [r["prompt"] for t in TASKS for r in get_task(t).generate(20, "test", seed=5)]
    jobs = [(models[i % len(models)], prompts[i % len(prompts)], 4 + i % 13) for i in range(300)]
    with live_server(runtime) as (url, _):
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=16)) as h:
            def one(job):
                model, prompt, n = job
                t0 = time.perf_counter()
                r = h.post("/v1/chat/completions", json=chat_body(model, content=prompt, max_tokens=n, ignore_eos=True))
                return r.status_code, time.perf_counter() - t0, r.json()

            t0 = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(one, jobs))
            wall = time.perf_counter() - t0
            metrics = h.get("/metrics").text
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 300, [r for r in results if r[0] != 200][:3]
    for (model, _, n), (_, _, body) in zip(jobs, results):
        assert body["usage"]["completion_tokens"] == n  # no cross-talk: each row got its own length
    lat = sorted(t for _, t, _ in results)
    tokens = sum(n for _, _, n in jobs)
    print(f"\nload test: 300 requests, 16 concurrent, {wall:.2f}s, {tokens / wall:.0f} tok/s, "
          f"p50 {statistics.median(lat) * 1000:.0f} ms, p99 {lat[int(0.99 * len(lat)) - 1] * 1000:.0f} ms")
    assert 'lorastack_requests_total{endpoint="/v1/chat/completions",status="200"} 300.0' in metrics
    assert 'lorastack_adapter_requests_total{adapter="reverse_words"}' in metrics
    for name in ("lorastack_queue_depth", "lorastack_batch_size", "lorastack_resident_adapters",
                 "lorastack_request_seconds_bucket", "lorastack_time_to_first_token_seconds_bucket", "lorastack_tokens_total"):
        assert name in metrics


def test_schema_fuzz_has_no_server_errors(runtime, tmp_path):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    app = create_app(runtime, ServeSettings(max_tokens_cap=8, default_max_tokens=4, import_roots=(tmp_path,)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ran = []
    with TestClient(app):  # start the engine loop
        for op in schema.get_all_operations():
            operation = op.ok()
            if operation.path == "/metrics":
                continue

            # The generation endpoints get more cases: their schema is the widest, and both
            # rejections and real generations must show up among them.
            n_examples = 80 if operation.path in ("/v1/chat/completions", "/v1/completions") else 25

            @settings(max_examples=n_examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            # Half the cases keep the fuzzed `model`; the rest use a real one so generation runs.
            @given(case=operation.as_strategy(), model=st.sampled_from([None, "base", "auto", "reverse_words", "a:1+b:1"]))
            def check(case, model):
                if model and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = model
                response = case.call()
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
                ran.append((operation.path, response.status_code))

            check()
    from collections import Counter

    print("\nfuzz statuses:", sorted(Counter(ran).items()))
    assert len(ran) >= 100
    # The generators must also have produced valid requests that ran, not only rejections.
    assert ("/v1/chat/completions", 200) in ran and ("/v1/completions", 200) in ran


def test_n_samples_share_one_request(runtime):
    with client(runtime) as c:
        greedy = c.post("/v1/chat/completions", json=chat_body("reverse_words")).json()["choices"][0]["message"]["content"]
        r = c.post("/v1/chat/completions", json=chat_body("reverse_words", n=3)).json()
        assert [ch["index"] for ch in r["choices"]] == [0, 1, 2]
        assert all(ch["message"]["content"] == greedy for ch in r["choices"])  # greedy samples are identical
        body = chat_body("reverse_words", n=4, temperature=1.5, seed=7, max_tokens=10)
        first = [ch["message"]["content"] for ch in c.post("/v1/chat/completions", json=body).json()["choices"]]
        again = [ch["message"]["content"] for ch in c.post("/v1/chat/completions", json=body).json()["choices"]]
        assert first == again and len(set(first)) > 1  # reproducible under a seed, and the samples differ
        r = c.post("/v1/completions", json={"model": "base", "prompt": ["a b", "c d"], "n": 2, "max_tokens": 3,
                                            "temperature": 0, "ignore_eos": True}).json()
        assert [ch["index"] for ch in r["choices"]] == [0, 1, 2, 3]
        assert r["choices"][0]["text"] == r["choices"][1]["text"] and r["choices"][2]["text"] == r["choices"][3]["text"]
        assert r["usage"]["completion_tokens"] == 4 * 3
