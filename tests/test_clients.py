"""Third-party clients against a live loopback server, as users run them: LangChain's
ChatOpenAI (invoke, stream) and OpenAIEmbeddings, and EleutherAI lm-eval's
`local-completions` (loglikelihood, multiple choice) and `local-chat-completions`
(generate_until) on a tiny local task written here. Each is checked against the project's
own computation: the engine's greedy output, the base's embeddings, and `engine.score`
log-likelihoods (lm-eval's accuracy must equal the one those give)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lorastack.engine.sampling import Sampling
from lorastack.engine.score import score
from lorastack.route import parse_spec
from lorastack.routing.knn import EMBED_LAYERS
from test_serve import live_server, runtime  # noqa: F401 - a fixture

PROMPT = "Reverse the order of these words: red green blue"


def greedy(runtime, model: str, messages: list[dict], max_tokens: int, stop: tuple[str, ...] = ()) -> str:
    """The engine's own answer (its loop not yet started)."""
    return runtime.engine.generate([messages], parse_spec(model), Sampling(max_tokens=max_tokens, stop=stop))[0].text


# ------------------------------------------------------------------ LangChain
def test_langchain_chat_invoke_stream_and_embeddings(runtime):
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    expected = greedy(runtime, "reverse_words", [{"role": "user", "content": PROMPT}], 12)
    with live_server(runtime) as (url, _):
        llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="reverse_words", temperature=0, max_tokens=12, max_retries=0)
        answer = llm.invoke(PROMPT)
        assert answer.content == expected
        assert answer.response_metadata["model_name"] == "reverse_words"
        chunks = list(llm.stream(PROMPT))
        assert len(chunks) > 1 and "".join(c.content for c in chunks) == expected
        assert [m.content for m in llm.batch([PROMPT, PROMPT])] == [expected, expected]
        scored = llm.bind(logprobs=True).invoke(PROMPT)  # LangChain keeps OpenAI's logprobs in its metadata
        assert "".join(t["token"] for t in scored.response_metadata["logprobs"]["content"]) == expected
        # Embeddings: tiktoken-free (the server's tokenizer is not OpenAI's), the base's own vectors.
        emb = OpenAIEmbeddings(base_url=url + "/v1", api_key="unused", model="base", check_embedding_ctx_length=False)
        got = np.array(emb.embed_documents([PROMPT, "hello"]))
    tok = runtime.base.tokenizer
    want = runtime.engine.runner.embed([tok(t, add_special_tokens=False)["input_ids"] for t in [PROMPT, "hello"]], EMBED_LAYERS).numpy()
    assert np.allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


# ------------------------------------------------------------------ lm-eval
MC_DOCS = [  # question, choices, label: the label does not matter, only that both sides agree
    ("Reverse the order of these words: red green blue", ["blue green red", "red green blue", "green"], 0),
    ("Reverse the order of these words: one two", ["two one", "one two"], 0),
    ("Add the numbers 2 and 3", ["5", "6", "23"], 0),
    ("Rewrite the date 2031-04-09 in words", ["April 9, 2031", "9 April", "2031"], 0),
    ("Sort these words: pear fig", ["fig pear", "pear fig"], 1),
    ("Count the items: a, b, c", ["3", "2"], 0),
]


def _write_task(root: Path, name: str, docs: list[dict], config: dict) -> Path:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / f"{name}.yaml").write_text(json.dumps({  # YAML is a superset of JSON
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        **config}))
    return root


@pytest.fixture()
def lm_eval_env(tmp_path, monkeypatch):
    """lm-eval offline: datasets' cache in the test's folder, no hub access."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path


@pytest.mark.parametrize("tokenizer", ["local", "remote"])
def test_lm_eval_multiple_choice_score_equals_the_projects_own(runtime, lm_eval_env, tiny_tokenizer, tokenizer):
    """`local`: lm-eval reads a copy of the tokenizer; `remote`: nothing but the URL, lm-eval
    finds the server's /tokenize and /tokenizer_info and tokenizes through them."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tmp = lm_eval_env
    tok_dir = tmp / "tokenizer"
    tiny_tokenizer.save_pretrained(tok_dir)
    (tmp / "tasks").mkdir()
    tasks = _write_task(tmp / "tasks", "lorastack_mc", [{"question": q, "choices": c, "label": y} for q, c, y in MC_DOCS], {
        "output_type": "multiple_choice", "doc_to_text": "{{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]})
    model = "reverse_words"
    # The project's own computation, on lm-eval's split of each (context, continuation) pair:
    # context alone, then whatever the whole adds (lm-eval's _encode_pair).
    tok = runtime.base.tokenizer
    seqs, owners = [], []
    for i, (q, choices, _) in enumerate(MC_DOCS):
        ctx = f"{q}\nAnswer:"
        for c in choices:
            cont = " " + c  # lm-eval's default target_delimiter
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
            seqs.append((ctx_ids, whole[len(ctx_ids):]))
            owners.append(i)
    ours = score(runtime.engine, seqs, [parse_spec(model)] * len(seqs))
    own_acc = np.mean([int(np.argmax([s for s, o in zip(ours, owners) if o == i]) == y) for i, (_, _, y) in enumerate(MC_DOCS)])

    with live_server(runtime) as (url, _):
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{url}/v1/completions", "model": model, "num_concurrent": 1, "max_retries": 1,
                        **({"tokenizer": str(tok_dir), "tokenizer_backend": "huggingface"} if tokenizer == "local" else {})},
            tasks=["lorastack_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True, limit=None,
        )
    acc = out["results"]["lorastack_mc"]["acc,none"]
    assert acc == pytest.approx(own_acc, abs=1e-9), (acc, own_acc)
    theirs = [resp[0][0] for s in sorted(out["samples"]["lorastack_mc"], key=lambda s: s["doc_id"]) for resp in s["resps"]]
    assert np.allclose(theirs, ours, atol=1e-3), (theirs, ours)
    assert 0 < own_acc < 1 or len(set(np.round(ours, 3))) > 1  # the scores are real numbers, not all equal


def test_lm_eval_chat_generate_until_equals_the_engine(runtime, lm_eval_env):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tmp = lm_eval_env
    (tmp / "tasks").mkdir()
    docs = [{"question": q, "answer": c[y]} for q, c, y in MC_DOCS[:4]]
    tasks = _write_task(tmp / "tasks", "lorastack_gen", docs, {
        "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]})
    model = "date_format"
    own = [greedy(runtime, model, [{"role": "user", "content": d["question"]}], 8, stop=("\n", "<|im_end|>")) for d in docs]
    with live_server(runtime) as (url, _):
        out = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args={"base_url": f"{url}/v1/chat/completions", "model": model, "num_concurrent": 1, "max_retries": 1},
            tasks=["lorastack_gen"], task_manager=TaskManager(include_path=str(tasks)), apply_chat_template=True, log_samples=True,
        )
    samples = sorted(out["samples"]["lorastack_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == own
    want = np.mean([o.strip() == d["answer"] for o, d in zip(own, docs)])
    assert out["results"]["lorastack_gen"]["exact_match,none"] == pytest.approx(want)
