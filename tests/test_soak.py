"""Soak: 2,000 mixed requests against a live loopback server (tiny model) with random valid
and invalid parameters, streams cut short by their clients, and an adapter imported and
deleted over and over meanwhile. No request may hang or get a 5xx, every valid one is
answered, and memory stays flat after warm-up. Bounded in count and time; loopback only."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_library import make_peft_adapter
from test_serve import live_server, runtime  # noqa: F401 - fixtures

N_REQUESTS = 2000
WARMUP = 300
CONCURRENCY = 16

VALID_MODELS = ["base", "reverse_words", "date_format", "auto", "reverse_words:0.5+date_format:0.5", "hot"]
INVALID = [  # (body changes, expected status range)
    ({"seed": 2**64}, (400, 499)), ({"model": "nope"}, (404, 404)), ({"model": "reverse_words\n"}, (400, 499)),
    ({"model": "auto:"}, (400, 499)), ({"max_tokens": -1}, (400, 499)), ({"max_tokens": 10**6}, (400, 499)),
    ({"n": 9}, (400, 499)), ({"temperature": -1}, (400, 499)), ({"top_p": 0}, (400, 499)), ({"messages": []}, (400, 499)),
]


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def make_job(rng: random.Random, i: int) -> dict:
    body = {"model": rng.choice(VALID_MODELS),
            "messages": [{"role": "user", "content": f"Reverse the order of these words: {' '.join(rng.sample(['red', 'green', 'blue', 'sun', 'moon', 'fig'], 3))}"}],
            "max_tokens": rng.randint(1, 12),
            "temperature": rng.choice([0, 0.7, 1.3, 1e-300, 2.0]),
            "top_p": rng.choice([1.0, 0.9, 1e-300]), "seed": rng.choice([None, 0, 2**64 - 1, -5])}
    kind = rng.random()
    if kind < 0.25:
        change, expect = rng.choice(INVALID)
        return {"body": {**body, **change}, "expect": expect, "kind": "invalid"}
    if kind < 0.30:
        return {"raw": b'{"model": "base", "messages": [', "expect": (400, 400), "kind": "invalid"}
    if kind < 0.38:
        return {"body": {**body, "model": "base", "max_tokens": 200, "ignore_eos": True, "stream": True}, "kind": "disconnect"}
    body["stream"] = rng.random() < 0.3
    # "hot" is imported and deleted meanwhile: 404 is a correct answer for it.
    return {"body": body, "expect": (200, 200) if body["model"] != "hot" else (200, 404), "kind": "valid"}


def run_job(h: httpx.Client, job: dict) -> tuple[str, int, str]:
    if job["kind"] == "disconnect":
        with h.stream("POST", "/v1/chat/completions", json=job["body"]) as r:
            status = r.status_code
            next(r.iter_lines(), None)  # read one event, then hang up
        return job["kind"], status, ""
    if "raw" in job:
        r = h.post("/v1/chat/completions", content=job["raw"], headers={"content-type": "application/json"})
        return job["kind"], r.status_code, r.text[:200]
    r = h.post("/v1/chat/completions", json=job["body"])
    text = r.text
    if r.status_code == 200:
        if job["body"].get("stream"):
            assert text.rstrip().endswith("data: [DONE]"), text[-300:]
            assert '"finish_reason"' in text
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    return job["kind"], r.status_code, text[:200]


@pytest.mark.slow
def test_soak_mixed_valid_invalid_disconnects_and_hot_reload(runtime, tiny_base, tmp_path):
    runtime.base.model.config.max_position_embeddings = 4096
    root = tmp_path / "imports"
    src = make_peft_adapter(tiny_base, root / "hot", seed=9)
    rng = random.Random(1234)
    jobs = [make_job(rng, i) for i in range(N_REQUESTS)]
    stop = threading.Event()
    reload_errors: list[str] = []
    reloads = {"n": 0}

    with live_server(runtime, import_roots=(root,), max_queue=256) as (url, _):
        def hot_reload() -> None:
            with httpx.Client(base_url=url, timeout=60) as h:
                while not stop.is_set():
                    r = h.post("/v1/adapters", json={"path": str(src), "name": "hot", "overwrite": True})
                    if r.status_code != 201:
                        reload_errors.append(f"import {r.status_code} {r.text[:200]}")
                    time.sleep(0.05)
                    r = h.delete("/v1/adapters/hot")
                    if r.status_code not in (200, 404):
                        reload_errors.append(f"delete {r.status_code} {r.text[:200]}")
                    reloads["n"] += 1

        clients = threading.local()

        def one(job: dict) -> tuple[str, int, str]:
            if not hasattr(clients, "h"):
                clients.h = httpx.Client(base_url=url, timeout=60)  # a hang shows up as a timeout error
            return run_job(clients.h, job)

        reloader = threading.Thread(target=hot_reload)
        reloader.start()
        t0 = time.monotonic()
        try:
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                warm = list(pool.map(one, jobs[:WARMUP]))
                rss_warm = rss_bytes()
                rest = list(pool.map(one, jobs[WARMUP:]))
        finally:
            stop.set()
            reloader.join(timeout=60)
        wall = time.monotonic() - t0
        rss_end = rss_bytes()
        metrics = httpx.get(url + "/metrics").text
        health = httpx.get(url + "/health")

    results = warm + rest
    by_kind: dict[str, dict[int, int]] = {}
    for (kind, status, _), job in zip(results, jobs):
        by_kind.setdefault(kind, {}).setdefault(status, 0)
        by_kind[kind][status] += 1
    print(f"\nsoak: {len(results)} requests in {wall:.1f}s, {reloads['n']} import/delete cycles, statuses {json.dumps(by_kind)}, "
          f"RSS {rss_warm / 2**20:.0f} MiB after warm-up -> {rss_end / 2**20:.0f} MiB")
    assert len(results) == N_REQUESTS
    assert not [r for r in results if r[1] >= 500], [r for r in results if r[1] >= 500][:3]
    for (kind, status, text), job in zip(results, jobs):
        if "expect" in job:
            lo, hi = job["expect"]
            assert status in (lo, hi) or lo <= status <= hi and job["kind"] == "invalid", (job, status, text)
        else:
            assert status == 200
    assert by_kind["valid"].get(200, 0) > 800 and by_kind["disconnect"].get(200, 0) > 50
    assert not reload_errors, reload_errors[:3]
    assert reloads["n"] > 5
    assert health.status_code == 200
    assert 'status="499"' in metrics  # the cut streams were counted as such
    assert rss_end <= 1.10 * rss_warm, f"RSS grew from {rss_warm} to {rss_end}"
