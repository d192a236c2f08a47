"""Engine throughput vs peers, measured side by side in one run on the embedded base.

    python bench/engine.py [--tokens 32] [--n 1,4,8,16,32,64] [--dtype bfloat16] [--out out/bench]
                           [--task-library LIB] [--lookup-only]

Rows (every request generates exactly --tokens tokens, EOS ignored, greedy; lorastack rows
decode from the GGUF's Q4_1/Q8_0 blocks and without speculation unless said otherwise):
  (a) lorastack, each request on a different adapter     (b) lorastack, all on one adapter
  (c) lorastack, bare base (same engine)                 (d) HF generate, adapter merged into the base
  (e) PEFT generate(adapter_names=...) mixed batch       (f) PEFT sequential, set_adapter per request
  (g) llama.cpp (llama-cpp-python) on the same GGUF at batch 1, if installed
  (n) llama.cpp with adapter (a) exported by `lorastack adapters export --gguf` (lorastack/export.py,
      written as llama.cpp's convert_lora_to_gguf.py writes one), F16 and F32 factors, the faster
  (h) HF generate on the bare base (the batch-1 reference)
  (i) lorastack, bare base, aten's int8 weight-only decode of <= 4 rows (Engine int8_rows=4: what
      --int8 turns on where the compiled kernels cannot build)
  (o) lorastack, N different adapters, int8 matmuls (Engine int8_matmuls: what --int8 turns on with the
      compiled kernels; every layer projection in int8, kernels.c)
  (p) lorastack, bare base, int8 matmuls
  (j) lorastack, bare base, torch kernels only (LORASTACK_NATIVE=0: what the compiled
      bf16 decode kernels of engine/native.py buy)
  (k) lorastack, bare base, compiled kernels on the dequantized bf16 weights (what decoding
      from the GGUF blocks buys: compare with (c); same output by construction)
  (l) lorastack, one adapter, bf16 weights (compare with (b))
  (m) lorastack, bare base, as before GGUF blocks and compiled glue: bf16 weights, torch ops
      between the matmuls (compare with (c))
Prompt lookup (engine/speculative.py): batch 1, one adapter, greedy, each task's test prompts
one after another until EOS (at most 64 tokens), the same engine with and without drafts; the
outputs must be identical, the ratio is the speed-up. A "copy" row does the same with the bare
base asked to repeat passages written for this bench (an answer that copies its prompt in order,
which none of the three tasks' answers does).
Engine and HF rows are the best of --repeats runs (the machine is shared and noisy); rows a-c, o
and p run their repeats interleaved, so that their ratios compare the same moments.
Rows a-c are also printed decode only (the steps after every request's first token), next to
the end-to-end figure, which also pays the N prompts' prefill.
Prefill rows (--prefill-only runs just these): one prompt of 20-100 tokens through the tiled kernel
vs torch's GEMM, from the GGUF blocks and from the bf16 weights.
Int8 layers change outputs a little: the greedy tokens of rows (a) and (o) are compared at every N
(rows whose whole output agrees, and tokens before each row's first difference).
Also: time to first token for a 256-token prompt, peak RSS, memory bandwidth and the
batch-1 roofline, and the compute roofline (the dot-product instructions' peak rate, measured
from registers in the same run, over the matmuls' multiply-adds a token) with the share of it
that decode reaches at N > 1, and the end-to-end one (each request's prompt prefill counted too)
with the share the N-adapter rows reach. Prints a table and ratios; writes engine.json and engine.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lorastack.atomic import scratch_dir  # noqa: E402
from lorastack.base import Base, embedded_gguf_path  # noqa: E402
from lorastack.engine.engine import Engine  # noqa: E402
from lorastack.engine.native import MAX_ROWS  # noqa: E402
from lorastack.engine.sampling import Sampling  # noqa: E402
from lorastack.library import Library  # noqa: E402
from lorastack.route import BASE_ROUTE, parse_spec  # noqa: E402
from kernels import machine_load  # noqa: E402 - bench/kernels.py, this script's neighbour

PROMPT = "Reverse the order of these words: harbor tiger fancy quick vast kind"


def make_adapters(base: Base, lib: Library, n: int, tmp: Path) -> list[str]:
    """Random rank-16 all-linear LoRAs (weights do not matter for speed, shapes do)."""
    from peft import LoraConfig, get_peft_model

    names = []
    model = get_peft_model(copy.deepcopy(base.model), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        model.save_pretrained(tmp / f"a{i}")
        lib.add(tmp / f"a{i}", f"bench{i}", base=base)
        names.append(f"bench{i}")
    return names


def engine_tps(engine: Engine, ids: list[int], routes: list, tokens: int) -> float:
    """End-to-end tok/s: every request's prefill and its `tokens` generated tokens."""
    return engine_tps_split(engine, ids, routes, tokens)[0]


def engine_tps_split(engine: Engine, ids: list[int], routes: list, tokens: int) -> tuple[float, float]:
    """(end to end, decode only) tok/s of one run. Decode only counts the steps after every
    request has its first token (the prefills are done): what the decode kernels sustain, the
    figure to hold against a roofline; end to end also pays N prompts' prefill (at N=16 with
    32 tokens each, about a quarter of the time)."""
    s = Sampling(max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    reqs = [engine.submit_ids(ids, r, s) for r in routes]
    t1, first = None, 0  # when every request had its first token, and how many tokens there were then
    while not all(r.done for r in reqs):
        engine.step()
        if t1 is None and all(r.tokens for r in reqs):
            t1, first = time.perf_counter(), sum(len(r.tokens) for r in reqs)
    t2 = time.perf_counter()
    assert all(len(r.tokens) == tokens for r in reqs)
    total = len(routes) * tokens
    decode = (total - first) / (t2 - t1) if t1 is not None and t2 > t1 and total > first else float("nan")
    return total / (t2 - t0), decode


def agreement(exact: Engine, approx: Engine, base: Base, routes: list, tokens: int) -> dict[str, float]:
    """Greedy outputs of two engines on the same requests (one different prompt per row, so that
    the rows do not all agree or differ together): the fraction of rows whose tokens are all
    identical, and of tokens before each row's first difference."""
    words = "harbor tiger fancy quick vast kind amber otter lemon pilot cedar brisk".split()
    prompts = [base.chat_ids([{"role": "user", "content": "Reverse the order of these words: "
                               + " ".join(words[(i + j * 5) % len(words)] for j in range(6))}]) for i in range(len(routes))]
    outs = []
    for eng in (exact, approx):
        reqs = [eng.submit_ids(p, r, Sampling(max_tokens=tokens, ignore_eos=True)) for p, r in zip(prompts, routes)]
        while not all(r.done for r in reqs):
            eng.step()
        outs.append([r.tokens for r in reqs])
    same = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(*outs)]
    return {"rows": sum(s == tokens for s in same) / len(same), "tokens": sum(same) / (tokens * len(same))}


LOOKUP_TASKS = ("reverse_words", "json_field", "date_format")
# For the "copy" lookup row: none of the three tasks above answers by copying a span of its
# prompt in order (reversed words, one field, a reformatted date), so this row shows what drafts
# give where the answer does. Passages written for this bench.
COPY_PASSAGES = (
    "The quick brown fox jumps over the lazy dog near the river bank every morning before sunrise. Then it "
    "runs back to the old barn behind the farm house, where it sleeps until noon.",
    "Our team meeting is moved to Thursday at three in the afternoon because the main room is booked. Please "
    "bring the quarterly report and your notes from the client call on Monday.",
    "Please send the signed contract to the legal department by Friday so that we can start the project. If you "
    "have questions about the payment terms, call the finance office first.",
    "The library on Elm Street opens at nine on weekdays and at ten on Saturdays. Books borrowed before the "
    "holiday can be returned in the grey box next to the front door.",
    "To reset the router, hold the small button on the back for ten seconds until the light turns orange, then "
    "wait two minutes and connect again with the password printed on the label.",
    "The museum's new wing shows paintings from the northern coast, most of them small landscapes of harbors, "
    "fishing boats and the cliffs near the lighthouse, painted between the two wars.",
    "Fresh bread is baked twice a day in the shop on the corner, once at six in the morning and again at four in "
    "the afternoon, and the rye loaf sells out first.",
    "Train 412 to the airport leaves from platform seven at twenty past eight; passengers with large bags are "
    "asked to use the last two carriages, which have luggage racks.",
)


def task_agreement(base: Base, trained: Library, n: int = 64) -> dict[str, dict[str, float]]:
    """Exact vs int8 matmuls on trained adapters' own test prompts (greedy, to EOS, at most 64
    tokens, all prompts of a task in one batch): identical answers and exact-match accuracy of each."""
    from lorastack.tasks import get_task

    out = {}
    engines = {k: Engine(base, resolve=trained.get, max_batch=n, prefix_cache=0, speculate=0, int8_matmuls=k == "int8")
               for k in ("exact", "int8")}
    for task in LOOKUP_TASKS:
        if task not in trained.names():
            continue
        t = get_task(task)
        records = t.generate(n, "test", seed=0)
        answers = {kind: [g.text for g in eng.generate([r["prompt"] for r in records], parse_spec(task), Sampling(max_tokens=64))]
                   for kind, eng in engines.items()}
        out[task] = {"identical": sum(a == b for a, b in zip(answers["exact"], answers["int8"])) / n,
                     **{f"accuracy_{k}": sum(t.score(a, r) for a, r in zip(v, records)) / n for k, v in answers.items()}}
    return out


PREFILL_LENGTHS = (20, 40, 64, 100)


def prefill_rows(base: Base, repeats: int) -> dict[str, dict[int, float]]:
    """One prompt's prefill (time to first token, ms, best of 4 x `repeats`) at PREFILL_LENGTHS
    tokens, up to 64 rows through kernels.c's tiled path (llama.py's BLOCK_TILE_ROWS) and with
    torch's GEMM above 8 rows instead, from the GGUF blocks and from the bf16 weights."""
    words = "harbor tiger fancy quick vast kind apple river stone cloud".split()
    out: dict[str, dict[int, float]] = {}
    for weights, blocks in (("blocks", True), ("bf16", False)):
        engine = Engine(base, resolve=lambda n: None, prefix_cache=0, speculate=0, gguf_blocks=blocks)
        tiled = engine.runner.tile_rows
        for length in PREFILL_LENGTHS:
            text = "Reverse the order of these words: " + " ".join((words * 20)[: max(1, length - 12)])
            ids = base.chat_ids([{"role": "user", "content": text}])[:length]
            for label, rows in (("tiled", tiled), ("torch", MAX_ROWS)):
                engine.runner.tile_rows = rows
                best = float("inf")
                for _ in range(4 * repeats):
                    t0 = time.perf_counter()
                    req = engine.submit_ids(ids, BASE_ROUTE, Sampling(max_tokens=1))
                    while not req.done:
                        engine.step()
                    best = min(best, (req.first_token_at - t0) * 1000)
                out.setdefault(f"{weights} {label}", {})[len(ids)] = best
            engine.runner.tile_rows = tiled
    for key, row in out.items():
        print(f"prefill {key:13}" + "".join(f"  {n} tok {ms:6.1f} ms" for n, ms in row.items()), flush=True)
    return out


def prompt_lookup_rows(base: Base, resolve, adapter: str, n: int, repeats: int,
                       trained: Library | None = None) -> dict[str, dict]:
    """Batch-1 tok/s on each task's test prompts with and without prompt-lookup drafts: end to
    end (prefill included: these answers are short) and decode only (after the first token).
    With `trained`, a task whose adapter that library holds runs on it (its real answers, so
    its real draft acceptance); otherwise on `adapter` (random weights: the base's answers)."""
    from lorastack.tasks import get_task

    have = set(trained.names()) if trained is not None else set()

    def find(name: str):
        return trained.get(name) if name in have else resolve(name)

    engines = {"plain": Engine(base, resolve=find, prefix_cache=0, speculate=0),
               "lookup": Engine(base, resolve=find, prefix_cache=0)}
    s = Sampling(max_tokens=64)
    out = {}
    for task in LOOKUP_TASKS + ("copy",):
        if task == "copy":  # an answer that copies its input: the bare base asked to repeat a passage
            used, route = "base", BASE_ROUTE
            prompts = [f"Copy this text exactly, with no other words: {p}" for p in COPY_PASSAGES[:n]]
        else:
            used = task if task in have else adapter
            route = parse_spec(used)
            prompts = [r["prompt"] for r in get_task(task).generate(n, "test", seed=0)]
        tps, dtps, texts = {}, {}, {}
        for _ in range(repeats):
            for kind, eng in engines.items():  # interleaved, so both see the same machine load
                before = dict(eng.stats)
                t0, toks, got, decode_s = time.perf_counter(), 0, [], 0.0
                for p in prompts:
                    req = eng.submit(p, route, s)
                    while not req.done:
                        eng.step()
                    toks += len(req.tokens)
                    decode_s += req.finished_at - req.first_token_at
                    got.append(req.tokens)
                tps[kind] = max(tps.get(kind, 0.0), toks / (time.perf_counter() - t0))
                dtps[kind] = max(dtps.get(kind, 0.0), (toks - len(prompts)) / decode_s)
                texts[kind] = got
                if kind == "lookup":
                    drafted, accepted = eng.stats["drafted"] - before["drafted"], eng.stats["accepted"] - before["accepted"]
        out[task] = {"plain": tps["plain"], "lookup": tps["lookup"], "speedup": tps["lookup"] / tps["plain"],
                     "decode_plain": dtps["plain"], "decode_lookup": dtps["lookup"],
                     "decode_speedup": dtps["lookup"] / dtps["plain"],
                     "identical": texts["plain"] == texts["lookup"], "tokens": toks, "drafted": drafted, "accepted": accepted,
                     "adapter": "base" if used == "base" else "trained" if used == task else "random"}
        print(f"prompt lookup {task}: {out[task]}", flush=True)
    return out


def hf_tps(model, ids: list[int], n: int, tokens: int, **kw) -> float:
    x = torch.tensor([ids] * n)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=2, **kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] - x.shape[1] == tokens
    return n * tokens / dt


def bandwidth_gbs() -> float:
    a = torch.empty(64 * 1024 * 1024, dtype=torch.float32)
    b = torch.empty_like(a)
    a.fill_(1.0)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n", default="1,4,8,16,32,64")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--peers-max-n", type=int, default=16, help="skip slow peers (e, f) above this N")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs for rows a-d, h-j")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--lookup-prompts", type=int, default=8, help="test prompts per task for the prompt-lookup rows")
    ap.add_argument("--task-library", type=Path, default=None,
                    help="a library with trained reverse_words/json_field/date_format adapters: the prompt-lookup rows "
                    "use them (real answers, real draft acceptance) instead of a random adapter")
    ap.add_argument("--lookup-only", action="store_true", help="run only the prompt-lookup rows")
    ap.add_argument("--prefill-only", action="store_true", help="run only the prefill rows (tiled kernel vs torch's GEMM)")
    args = ap.parse_args()
    ns = sorted({1, *(int(x) for x in args.n.split(","))})  # batch 1 always runs: the summary compares it
    torch.manual_seed(0)
    load, cores, loaded = machine_load()
    print(f"load average at start {load:.1f} on {cores} cores" + (
        ": other work is running; every row will be slower and noisier (an idle machine gives comparable figures)"
        if loaded else ""), flush=True)

    base = Base.load("embedded", dtype=args.dtype)
    if args.prefill_only:
        prefill_rows(base, args.repeats)
        return
    with scratch_dir("lorastack-bench-") as tmp:  # 2+ GB of adapters and GGUF exports, removed however the run ends
        lib = Library(tmp / "lib")
        names = make_adapters(base, lib, 1 if args.lookup_only else max(ns), tmp)
        trained = Library(args.task_library) if args.task_library else None
        if args.lookup_only:
            prompt_lookup_rows(base, lib.get, names[0], args.lookup_prompts, args.repeats, trained)
            return
        ids = base.chat_ids([{"role": "user", "content": PROMPT}])
        T = args.tokens
        engine = Engine(base, resolve=lib.get, max_batch=max(ns), max_resident=max(ns), prefix_cache=0, speculate=0)
        engine_tps(engine, ids, [parse_spec(n) for n in names], 4)  # warm-up: loads every adapter once
        load_s = engine.bank.load_seconds

        # Peers: PEFT with every adapter loaded (mixed batches and switching), and a merged model.
        from peft import PeftModel

        peft = PeftModel.from_pretrained(copy.deepcopy(base.model), str(lib.get(names[0]).path), adapter_name=names[0])
        for n in names[1:]:
            peft.load_adapter(str(lib.get(n).path), adapter_name=n)
        peft.eval()
        merged = PeftModel.from_pretrained(copy.deepcopy(base.model), str(lib.get(names[0]).path)).merge_and_unload().eval()

        int8 = Engine(base, resolve=lib.get, max_batch=max(ns), max_resident=max(ns), prefix_cache=0, int8_rows=4, speculate=0)
        i8b = Engine(base, resolve=lib.get, max_batch=max(ns), max_resident=max(ns), prefix_cache=0, speculate=0, int8_matmuls=True)
        plain = Engine(base, resolve=lib.get, max_batch=max(ns), max_resident=max(ns), prefix_cache=0, native=False, speculate=0)
        bf16 = Engine(base, resolve=lib.get, max_batch=max(ns), max_resident=max(ns), prefix_cache=0, gguf_blocks=False, speculate=0)
        before = Engine(base, resolve=lib.get, max_batch=max(ns), max_resident=max(ns), prefix_cache=0, gguf_blocks=False, speculate=0)
        before.runner.glue = before.runner.attention_kernel = False
        blocks_note = f"{len(engine.runner.blocks)} matrices from GGUF blocks" if engine.runner.blocks else "no GGUF blocks in use"
        native_note = "compiled kernels in use" if engine.runner.native else "compiled kernels unavailable here: torch only"
        rows: dict[str, dict[int, float]] = {k: {} for k in "abcdefghijklmnop"}
        agree: dict[int, dict[str, float]] = {}

        def best(fn, *a, **kw) -> float:
            return max(fn(*a, **kw) for _ in range(args.repeats))

        decode: dict[str, dict[int, float]] = {k: {} for k in "abcop"}  # decode-only tok/s of rows a-c, o, p

        def best_split(n: int, runs: dict[str, tuple[Engine, list]]) -> None:
            """Rows a-c, o, p: their repeats interleaved (a b c o p, a b c o p, ...), so that a load
            change on this shared machine hits every row alike and their ratios stay fair."""
            got: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
            for _ in range(args.repeats):
                for key, (eng, routes) in runs.items():
                    got[key].append(engine_tps_split(eng, ids, routes, T))
            for key, r in got.items():
                rows[key][n], decode[key][n] = max(x[0] for x in r), max(x[1] for x in r)

        for n in ns:
            mixed = [parse_spec(names[i]) for i in range(n)]
            best_split(n, {"a": (engine, mixed), "b": (engine, [parse_spec(names[0])] * n), "c": (engine, [BASE_ROUTE] * n),
                           "o": (i8b, mixed), "p": (i8b, [BASE_ROUTE] * n)})
            agree[n] = agreement(engine, i8b, base, [parse_spec(names[i]) for i in range(n)], T)
            rows["d"][n] = best(hf_tps, merged, ids, n, T)
            rows["h"][n] = best(hf_tps, base.model, ids, n, T)
            rows["j"][n] = best(engine_tps, plain, ids, [BASE_ROUTE] * n, T)
            rows["k"][n] = best(engine_tps, bf16, ids, [BASE_ROUTE] * n, T)
            rows["l"][n] = best(engine_tps, bf16, ids, [parse_spec(names[0])] * n, T)
            rows["m"][n] = best(engine_tps, before, ids, [BASE_ROUTE] * n, T)
            if n <= int8.runner.int8_rows:
                rows["i"][n] = best(engine_tps, int8, ids, [BASE_ROUTE] * n, T)
            if n <= args.peers_max_n:
                rows["e"][n] = hf_tps(peft, ids, n, T, adapter_names=names[:n])
                t0 = time.perf_counter()
                for i in range(n):
                    peft.set_adapter(names[i])
                    hf_tps(peft, ids, 1, T)
                rows["f"][n] = n * T / (time.perf_counter() - t0)
            print(f"N={n}: " + "  ".join(f"({k}) {v[n]:.0f}" for k, v in rows.items() if n in v), flush=True)

        try:  # (g) llama.cpp, optional; (n) the same with adapter names[0] as a llama.cpp LoRA
            from llama_cpp import Llama

            text = base.render([{"role": "user", "content": PROMPT}])

            def llama_tps(llm) -> float:  # EOS banned so that every run makes exactly T tokens, like the others
                t0 = time.perf_counter()
                out = llm.create_completion(text, max_tokens=T, temperature=0, logit_bias={llm.token_eos(): -1e9})
                return out["usage"]["completion_tokens"] / (time.perf_counter() - t0)

            def llama(lora: Path | None = None):
                return Llama(model_path=str(embedded_gguf_path()), lora_path=str(lora) if lora else None, n_ctx=512,
                             n_threads=torch.get_num_threads(), verbose=False)

            rows["g"][1] = best(llama_tps, llama())
            g_note = "llama-cpp-python, Q4_1 weights"
            from lorastack.export import GGUF_FILE, export

            speeds = {}
            for dtype in ("float16", "float32"):
                export(lib, names[0], tmp / f"gguf-{dtype}", mode="gguf", base=base, dtype=dtype)
                speeds[dtype] = best(llama_tps, llama(tmp / f"gguf-{dtype}" / GGUF_FILE))
            fastest = max(speeds, key=speeds.get)
            rows["n"][1] = speeds[fastest]
            n_note = "exported LoRA, " + ", ".join(f"{k} {v:.0f}" for k, v in speeds.items()) + " tok/s"
        except ImportError:
            g_note = n_note = "llama-cpp-python not installed (pip install lorastack[bench])"

        lookup = prompt_lookup_rows(base, lib.get, names[0], args.lookup_prompts, args.repeats, trained)
        task_agree = task_agreement(base, trained) if trained is not None else {}
        prefill = prefill_rows(base, args.repeats)

        # Time to first token for a 256-token prompt, alone on an idle engine.
        long_ids = (ids * 20)[:256]
        ttft = []
        for route in (BASE_ROUTE, parse_spec(names[0])):
            t0 = time.perf_counter()
            req = engine.submit_ids(long_ids, route, Sampling(max_tokens=1))
            while not req.done:
                engine.step()
            ttft.append(req.first_token_at - t0)
        bw = bandwidth_gbs()
        weight_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
        roofline = bw * 1e9 / weight_bytes
        # What a decode step streams from the GGUF blocks: the blocks, plus the bf16 norms.
        block_bytes = sum(b.data.numel() for b in engine.runner.blocks.values()) + sum(
            p.numel() * p.element_size() for name, p in base.model.named_parameters() if "norm" in name)
        roofline_blocks = bw * 1e9 / block_bytes
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # Compute roofline: the matmuls' multiply-adds a token (layers and LM head; attention and
        # LoRA not counted) at the dot-product instructions' peak rate, measured now from registers.
        macs_token = sum(p.numel() for name, p in base.model.named_parameters()
                         if p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name) + base.model.lm_head.weight.numel()
        native = engine.runner.native
        peak = {"bf16": native.peak_macs(), "int8": native.peak_macs(int8=True)} if native else {}
        compute_roofline = {k: v / macs_token for k, v in peak.items()}
        # End to end, a request also prefills its prompt: its len(ids) tokens through the layers (the
        # LM head only for the last one), then T - 1 decode steps for its T counted tokens.
        head_macs = base.model.lm_head.weight.numel()
        macs_request = len(ids) * (macs_token - head_macs) + head_macs + (T - 1) * macs_token
        compute_roofline_e2e = {k: v * T / macs_request for k, v in peak.items()}

        labels = {
            "a": "lorastack, N different adapters", "b": "lorastack, one adapter", "c": "lorastack, bare base",
            "d": "HF generate, merged adapter", "e": "PEFT mixed adapter_names", "f": "PEFT sequential set_adapter",
            "g": f"llama.cpp ({g_note})", "h": "HF generate, bare base",
            "i": "lorastack, bare base, aten int8 decode", "o": "lorastack, N adapters, int8 matmuls",
            "p": "lorastack, bare base, int8 matmuls", "j": "lorastack, bare base, torch only",
            "k": "lorastack, bare base, bf16 weights", "l": "lorastack, one adapter, bf16 weights",
            "m": "lorastack, bare base, as before (bf16, torch glue)", "n": f"llama.cpp + LoRA ({n_note})",
        }
        print(f"\ndecode throughput, tokens/s in total ({args.dtype}, {T} tokens per request, {torch.get_num_threads()} threads, "
              f"best of {args.repeats}; {native_note}; {blocks_note}; machine shared with other jobs)")
        print(f"{'':36}" + "".join(f"{'N=' + str(n):>10}" for n in ns))
        for k, label in labels.items():
            print(f"({k}) {label:32}" + "".join(f"{rows[k].get(n, float('nan')):>10.1f}" for n in ns))
        print("decode only, after every request's first token (rows a-c; the end-to-end rows above also pay the prefills):")
        for k in "abcop":
            print(f"({k}) {labels[k]:32}" + "".join(f"{decode[k].get(n, float('nan')):>10.1f}" for n in ns))
        print("int8 matmuls vs exact, greedy, N different adapters (a vs o): " + "  ".join(
            f"N={n} {a['rows']:.0%} rows identical, {a['tokens']:.0%} tokens before divergence" for n, a in agree.items()))
        ratios = {}
        for n in ns:
            r = {"a/c": rows["a"][n] / rows["c"][n], "a/d": rows["a"][n] / rows["d"][n]}
            if n in rows["e"]:
                r |= {"a/e": rows["a"][n] / rows["e"][n], "a/f": rows["a"][n] / rows["f"][n]}
            ratios[n] = r
            print(f"N={n}: " + "  ".join(f"{k} = {v:.2f}x" for k, v in r.items()))
        b1 = rows["c"][1] / rows["h"][1]
        print(f"batch-1 decode: lorastack base {rows['c'][1]:.1f} tok/s vs HF generate {rows['h'][1]:.1f} -> {b1:.2f}x")
        b1_int8 = rows["i"][1] / rows["h"][1] if 1 in rows["i"] else float("nan")
        if 1 in rows["g"]:
            print(f"batch-1 llama.cpp (Q4_1 GGUF, ~4.5 bits/weight): {rows['g'][1]:.1f} tok/s; lorastack base at "
                  f"{rows['c'][1] / rows['g'][1]:.2f}x, one adapter at {rows['b'][1] / rows['g'][1]:.2f}x of it")
        if 1 in rows["n"]:
            print(f"batch-1 with one LoRA: llama.cpp {rows['n'][1]:.1f} tok/s; lorastack {rows['b'][1]:.1f} -> "
                  f"{rows['b'][1] / rows['n'][1]:.2f}x (target >= 1.2x); with int8 matmuls {rows['o'][1]:.1f} -> "
                  f"{rows['o'][1] / rows['n'][1]:.2f}x")
        for n in ns:
            if n >= 16:
                target = {16: " (target 600)", 64: " (target 900)"}.get(n, "")
                print(f"N={n} on {n} different adapters: {rows['a'][n]:.0f} tok/s{target}, "
                      f"{rows['a'][n] / rows['c'][n]:.2f}x bare base (target >= 0.9x); decode only "
                      f"{decode['a'][n]:.0f} tok/s, {decode['a'][n] / decode['c'][n]:.2f}x bare base; with int8 matmuls "
                      f"{rows['o'][n]:.0f} tok/s ({rows['o'][n] / rows['a'][n]:.2f}x exact), {rows['o'][n] / rows['p'][n]:.2f}x "
                      f"bare base with int8 matmuls; decode only {decode['o'][n]:.0f}")
        print(f"batch-1 decode with --int8: {rows['i'].get(1, float('nan')):.1f} tok/s -> {b1_int8:.2f}x HF generate (bf16)")
        print(f"batch-1 decode from GGUF blocks vs bf16 weights: base {rows['c'][1] / rows['k'][1]:.2f}x (c/k), "
              f"one adapter {rows['b'][1] / rows['l'][1]:.2f}x (b/l); blocks + compiled glue vs as before: "
              f"{rows['c'][1] / rows['m'][1]:.2f}x (c/m)")
        print(f"memory bandwidth {bw:.1f} GB/s; bf16 weights {weight_bytes / 1e6:.0f} MB/token -> batch-1 roofline {roofline:.0f} tok/s "
              f"(bf16 row k reaches {rows['k'][1] / roofline:.0%}); GGUF blocks {block_bytes / 1e6:.0f} MB/token -> roofline "
              f"{roofline_blocks:.0f} tok/s (row c reaches {rows['c'][1] / roofline_blocks:.0%})")
        if compute_roofline:
            big = [n for n in ns if n > 1]

            def reach(key: str, kind: str) -> str:
                return " / ".join(f"{decode[key].get(n, float('nan')) / compute_roofline[kind]:.0%}" for n in big)

            print(f"compute: {macs_token / 1e6:.1f} M multiply-adds a token in the matmuls (layers + LM head; attention and "
                  f"LoRA not counted); dot products from registers {peak['bf16'] / 1e9:.0f} GMAC/s bf16, {peak['int8'] / 1e9:.0f} "
                  f"int8 -> roofline {compute_roofline['bf16']:.0f} tok/s exact, {compute_roofline['int8']:.0f} with int8 matmuls. "
                  f"Decode only at N = {' / '.join(map(str, big))}: bare base {reach('c', 'bf16')}, N adapters {reach('a', 'bf16')}; "
                  f"int8 bare base {reach('p', 'int8')}, int8 N adapters {reach('o', 'int8')}")
            e2e = " / ".join(f"{rows['a'].get(n, float('nan')) / compute_roofline_e2e['bf16']:.0%} exact, "
                             f"{rows['o'].get(n, float('nan')) / compute_roofline_e2e['int8']:.0%} int8" for n in big)
            print(f"compute, end to end (a request = its {len(ids)}-token prompt prefilled + {T - 1} decode steps for its {T} "
                  f"tokens): roofline {compute_roofline_e2e['bf16']:.0f} tok/s exact, {compute_roofline_e2e['int8']:.0f} with "
                  f"int8 matmuls; N adapters at N = {' / '.join(map(str, big))} reach {e2e}")
        else:
            print("compute roofline: not measured (the compiled kernels are not in use)")
        for task, r in task_agree.items():
            print(f"int8 matmuls vs exact on {task}'s trained adapter, 64 test prompts in one batch: {r['identical']:.0%} answers "
                  f"identical; exact match {r['accuracy_exact']:.1%} exact, {r['accuracy_int8']:.1%} int8")
        print("prompt lookup, batch 1, one adapter (tok/s without -> with drafts; end to end, then decode only):")
        for task, r in lookup.items():
            print(f"  {task:14} {r['plain']:7.1f} -> {r['lookup']:7.1f}  {r['speedup']:.2f}x;  decode {r['decode_plain']:7.1f} -> "
                  f"{r['decode_lookup']:7.1f}  {r['decode_speedup']:.2f}x  identical={r['identical']}  "
                  f"accepted {r['accepted']} of {r['drafted']} drafted tokens, {r['tokens']} tokens")
        print(f"time to first token, 256-token prompt: base {ttft[0] * 1000:.0f} ms, adapter {ttft[1] * 1000:.0f} ms")
        print(f"adapter load time (library -> engine): median {sorted(load_s)[len(load_s) // 2] * 1000:.0f} ms; peak RSS {peak_rss_mb:.0f} MB")

        args.out.mkdir(parents=True, exist_ok=True)
        result = {"dtype": args.dtype, "tokens": T, "threads": torch.get_num_threads(), "labels": labels,
                  "tokens_per_s": {k: v for k, v in rows.items() if v}, "decode_only_tokens_per_s": decode, "ratios": ratios, "int8_agreement": agree, "int8_task_agreement": task_agree, "batch1_vs_hf": b1, "batch1_int8_vs_hf": b1_int8,
                  "native": bool(engine.runner.native), "repeats": args.repeats,
                  "bandwidth_gbs": bw, "weight_bytes": weight_bytes, "roofline_tok_s": roofline,
                  "gguf_block_bytes": block_bytes, "roofline_blocks_tok_s": roofline_blocks, "prompt_lookup": lookup,
                  "macs_per_token": macs_token, "peak_macs_per_s": peak, "compute_roofline_tok_s": compute_roofline,
                  "compute_roofline_end_to_end_tok_s": compute_roofline_e2e,
                  "ttft_ms": {"base": ttft[0] * 1000, "adapter": ttft[1] * 1000}, "prefill_ms": prefill, "adapter_load_ms": [x * 1000 for x in load_s],
                  "peak_rss_mb": peak_rss_mb}
        (args.out / "engine.json").write_text(json.dumps(result, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for k, v in rows.items():
            if v:
                ax.plot(list(v), list(v.values()), marker="o", label=f"({k}) {labels[k]}")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("tokens/s (total)")
        ax.set_title(f"lorastack engine vs peers ({args.dtype}, embedded base)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "engine.png", dpi=120)
        print(f"wrote {args.out}/engine.json and engine.png")


if __name__ == "__main__":
    main()
