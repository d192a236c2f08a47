"""Server features every client sees: the route header, the access log, offline /docs and
/v1/embeddings (the base's own routing embeddings)."""

from __future__ import annotations

import base64
import logging
import re

import numpy as np
import pytest

from lorastack.routing.knn import EMBED_LAYERS
from test_serve import client, live_server, runtime  # noqa: F401 - a fixture


def test_route_header_on_both_endpoints_streaming_too(runtime):
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json={"model": "auto:knn", "messages": [{"role": "user", "content": "Rewrite the date 2031-04-09 in words"}],
                                                 "max_tokens": 2, "false_route": 1.0})
        assert r.status_code == 200 and r.headers["x-lorastack-route"] == r.json()["lorastack"]["spec"] == "date_format"
        with c.stream("POST", "/v1/chat/completions", json={"model": "reverse_words:0.5+date_format:0.5", "stream": True,
                                                             "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) as s:
            assert s.status_code == 200 and s.headers["x-lorastack-route"] == "reverse_words:0.5+date_format:0.5"
            assert "[DONE]" in "".join(s.iter_text())
        with c.stream("POST", "/v1/completions", json={"model": "base", "prompt": "hi", "stream": True, "max_tokens": 2}) as s:
            assert s.headers["x-lorastack-route"] == "base"
        r = c.post("/v1/completions", json={"model": "reverse_words", "prompt": ["a", "b"], "max_tokens": 1})
        assert r.headers["x-lorastack-route"] == "reverse_words,reverse_words"  # one route per prompt
        assert "x-lorastack-route" not in c.get("/v1/models").headers


def test_access_log_one_line_per_request(runtime, caplog):
    with client(runtime, access_log=True) as c, caplog.at_level(logging.INFO, logger="lorastack.access"):
        logging.getLogger("lorastack.access").propagate = True  # caplog listens at the root
        try:
            c.post("/v1/chat/completions", json={"model": "reverse_words", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 3, "ignore_eos": True})
            c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
            c.get("/health")
            c.post("/v1/embeddings", json={"model": "base", "input": ["a b", "c"]})
            c.post("/v1/completions", json={"model": "base", "prompt": [[5, 6, 7]], "echo": True, "logprobs": 0, "max_tokens": 0})
        finally:
            logging.getLogger("lorastack.access").propagate = False
    lines = [r.getMessage() for r in caplog.records if r.name == "lorastack.access"]
    assert len(lines) == 5, lines
    assert re.fullmatch(r'\S+ "POST /v1/chat/completions" 200 model=reverse_words route=reverse_words tokens=\d+\+3 latency_ms=[\d.]+',
                        lines[0]), lines[0]
    assert '"POST /v1/chat/completions" 404 model=- route=-' in lines[1]
    assert '"GET /health" 200' in lines[2]
    assert re.search(r'"POST /v1/embeddings" 200 model=base route=- tokens=\d+\+0 ', lines[3]), lines[3]
    assert '"POST /v1/completions" 200 model=base route=base tokens=3+0 ' in lines[4]


def test_no_access_log_by_default(runtime, caplog):
    with client(runtime) as c, caplog.at_level(logging.INFO):
        c.get("/health")
    assert not [r for r in caplog.records if r.name == "lorastack.access"]


def test_docs_render_offline(runtime):
    """/docs references no external host: Swagger UI comes from the installed package."""
    with client(runtime) as c:
        html = c.get("/docs").text
        assert "SwaggerUIBundle" in html and "/openapi.json" in html
        assert '"validatorUrl": null' in html  # Swagger UI's default online validator is off
        assert not re.findall(r"(?:src|href)=[\"']?(?:https?:)?//", html), "the docs page loads something from another host"
        urls = re.findall(r"(?:src|href)=[\"']?([^\"' >]+)", html) + re.findall(r"url: '([^']+)'", html)
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls)
        for u in urls:
            r = c.get(u)
            assert r.status_code == 200 and len(r.content) > 100, u
        js = c.get("/docs/assets/swagger-ui-bundle.js").text
        assert re.search(r'"5\.\d+\.\d+"', js)  # Swagger UI 5 reads FastAPI's OpenAPI 3.1
        assert c.get("/docs/assets/..%2Fpyproject.toml").status_code == 404
        assert c.get("/docs/assets/swagger-editor.js").status_code == 404  # a fixed list, not the folder


def test_embeddings_are_the_routers_unit_vectors(runtime):
    from openai import OpenAI

    texts = ["Reverse the order of these words: red green blue", "Rewrite the date 2031-04-09 in words"]
    tok = runtime.base.tokenizer
    direct = runtime.engine.runner.embed([tok(t, add_special_tokens=False)["input_ids"] for t in texts], EMBED_LAYERS).float().numpy()
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    with live_server(runtime) as (url, _):
        oa = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = oa.embeddings.create(model="base", input=texts)  # the client asks for base64 and decodes it
        got = np.array([d.embedding for d in r.data])
        assert got.shape == (2, runtime.base.model.config.hidden_size)
        assert np.allclose(got, direct, atol=1e-5) and r.usage.prompt_tokens == sum(len(tok(t)["input_ids"]) for t in texts)
        one = oa.embeddings.create(model="base", input=texts[1], encoding_format="float")
        assert np.allclose(one.data[0].embedding, direct[1], atol=1e-5)
        ids = oa.embeddings.create(model="base", input=[tok(texts[0])["input_ids"]], encoding_format="float")
        assert np.allclose(ids.data[0].embedding, direct[0], atol=1e-5)
        raw = base64.b64decode(oa.embeddings.with_raw_response.create(model="base", input="x", encoding_format="base64")
                               .http_response.json()["data"][0]["embedding"])
        assert len(raw) == 4 * runtime.base.model.config.hidden_size


@pytest.mark.parametrize("body, param", [({"model": "reverse_words", "input": "x"}, "model"), ({"model": "base", "input": ""}, "input"),
                                         ({"model": "base", "input": []}, "input"), ({"model": "base", "input": ["x"] * 65}, "input"),
                                         ({"model": "base", "input": "x", "dimensions": 8}, "dimensions"),
                                         ({"model": "base", "input": [10**6]}, "input"),
                                         ({"model": "base", "input": "word " * 300}, "input")])
def test_embeddings_refuse_bad_input_by_name(runtime, body, param):
    with client(runtime) as c:
        r = c.post("/v1/embeddings", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_vllm_tokenizer_endpoints(runtime):
    tok = runtime.base.tokenizer
    msgs = [{"role": "user", "content": "Reverse the order of these words: red green blue"}]
    with client(runtime) as c:
        r = c.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
        assert r["tokens"] == tok("hello world", add_special_tokens=False)["input_ids"] and r["count"] == len(r["tokens"])
        assert c.post("/tokenize", json={"messages": msgs}).json()["tokens"] == runtime.base.chat_ids(msgs)
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "hello world"}
        info = c.get("/tokenizer_info").json()
        assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
        for path, body, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "a", "messages": msgs}, "prompt"),
                                  ("/detokenize", {"tokens": [10**6]}, "tokens")]:
            r = c.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    with client(runtime, api_key="k") as c:
        assert c.get("/tokenizer_info").status_code == 401


def test_stacks_get_the_header_and_refuse_logprobs_by_name(runtime, tmp_path):
    from lorastack.stacks import StackStore
    from test_library import make_peft_adapter
    from test_stacks import SMALLEST, spec_of

    runtime.library.add(make_peft_adapter(runtime.base, tmp_path / "src" / "json_field", seed=7), "json_field", base=runtime.base)
    StackStore(runtime.library.root).add(spec_of(SMALLEST))
    msgs = [{"role": "user", "content": '{"born": "2000-01-01"}'}]
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json={"model": "stack/date-from-record", "messages": msgs, "n": 2})
        # (the random tiny adapters may overflow a stage's context: the route is named either way)
        assert r.headers["x-lorastack-route"] == "stack/date-from-record", r.text
        one = c.post("/v1/chat/completions", json={"model": "stack/date-from-record", "messages": msgs})
        if r.status_code == 200 and one.status_code == 200:  # n=2 counts the one prompt once, as for a route
            assert r.json()["usage"]["prompt_tokens"] == one.json()["usage"]["prompt_tokens"], (r.text, one.text)
        # What shapes the answer is refused, never ignored: each stage has its own limits and stops.
        for body, param in (({"logprobs": True}, "logprobs"), ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
                            ({"stop": "April"}, "stop"), ({"stop": ["x", "y"]}, "stop"), ({"max_tokens": 1}, "max_tokens"),
                            ({"max_completion_tokens": 5}, "max_completion_tokens")):
            r = c.post("/v1/chat/completions", json={"model": "stack/date-from-record", "messages": msgs, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        for body, param in (({"logprobs": 1}, "logprobs"), ({"echo": True, "max_tokens": 0}, "max_tokens"),
                            ({"stop": "\n"}, "stop"), ({"max_tokens": 3}, "max_tokens")):
            r = c.post("/v1/completions", json={"model": "stack/date-from-record", "prompt": msgs[0]["content"], **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
