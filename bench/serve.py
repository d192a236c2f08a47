"""HTTP serving overhead: the same workload through the engine directly and through `lorastack serve`.

    python bench/serve.py [--library DIR] [--requests 96] [--concurrency 16] [--max-tokens 32] [--json out/bench/serve.json]

Workload: requests cycling over every library adapter, `auto` and `base`, each asking for
exactly --max-tokens tokens (ignore_eos), at most --concurrency in flight. Both sides route
(`Runtime.decide`) and decode on the same engine in the same process, measured back to back.
Prints throughput (completion tokens/s), p50/p99 latency and the HTTP/engine ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from lorastack.engine.sampling import Sampling  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402
from lorastack.serve import ServeSettings, create_app  # noqa: E402
from lorastack.serve.background import running  # noqa: E402
from lorastack.tasks import get_task, list_tasks  # noqa: E402


def workload(rt: Runtime, n: int) -> list[tuple[str, str]]:
    names = rt.served()
    models = names + ["auto", "base"]
    tasks = [t.name for t in list_tasks()]
    prompts = [r["prompt"] for t in (names if set(names) <= set(tasks) and names else tasks) for r in get_task(t).generate(8, "test", seed=9)]
    return [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(n)]


def summarize(label: str, lat: list[float], tokens: int, wall: float) -> dict:
    lat = sorted(lat)
    out = {"tok_s": tokens / wall, "req_s": len(lat) / wall, "p50_ms": statistics.median(lat) * 1000,
           "p99_ms": lat[max(0, int(0.99 * len(lat)) - 1)] * 1000, "wall_s": wall}
    print(f"{label:>8}: {out['tok_s']:7.1f} tok/s  {out['req_s']:5.2f} req/s  p50 {out['p50_ms']:6.0f} ms  p99 {out['p99_ms']:6.0f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default=None)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", default="out/bench/serve.json")
    args = ap.parse_args()

    rt = Runtime.open("embedded", args.library)
    rt.max_batch = args.concurrency
    jobs = workload(rt, args.requests)
    sampling = Sampling(max_tokens=args.max_tokens, ignore_eos=True)
    print(f"{len(jobs)} requests, {args.concurrency} concurrent, {args.max_tokens} tokens each, "
          f"{len(rt.served())} adapters + auto + base")

    engine = rt.engine
    engine.start()

    def direct(job: tuple[str, str]) -> float:
        t0 = time.perf_counter()
        decision = rt.decide(job[0], [job[1]])[0]
        engine.submit(job[1], decision.route, sampling).result()
        return time.perf_counter() - t0

    with ThreadPoolExecutor(args.concurrency) as pool:  # warm-up: adapters resident, signatures built
        list(pool.map(direct, jobs[: args.concurrency]))
    results = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        lat = list(pool.map(direct, jobs))
    results["engine"] = summarize("engine", lat, len(jobs) * args.max_tokens, time.perf_counter() - t0)
    engine.stop()

    app = create_app(rt, ServeSettings(max_queue=4 * args.concurrency))
    with running(app) as url, httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=args.concurrency)) as h:
        def http(job: tuple[str, str]) -> float:
            t0 = time.perf_counter()
            r = h.post("/v1/chat/completions", json={"model": job[0], "messages": [{"role": "user", "content": job[1]}],
                                                     "temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True})
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == args.max_tokens
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            lat = list(pool.map(http, jobs))
        results["http"] = summarize("http", lat, len(jobs) * args.max_tokens, time.perf_counter() - t0)
    ratio = results["http"]["tok_s"] / results["engine"]["tok_s"]
    print(f"HTTP / engine throughput: {ratio:.2f} (target >= 0.80)")
    results.update(ratio=ratio, requests=len(jobs), concurrency=args.concurrency, max_tokens=args.max_tokens)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
