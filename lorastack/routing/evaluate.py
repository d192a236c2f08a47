"""Routing evaluation: does each input reach the right expert, and what does that buy?

Three columns per router, because a router that only works on the training phrasing is no
router at all:

- `in_template`: test-split inputs of the library's tasks, worded like the training data;
- `paraphrase`: the same tasks worded with held-out templates (`split=paraphrase`), or a
  user's own inputs for an adapter (`--data NAME=FILE.jsonl`);
- `unrelated`: generic requests (`lorastack.tasks.generic.heldout_prompts`, disjoint from
  the prompts routers calibrate on) plus inputs of tasks with no adapter (`--ood`): the
  share the router correctly leaves to the bare base.

End-task exact match of each router's routes against the oracle (each input's own
adapter) and the bare base, on the in-template and paraphrase inputs. Every distinct
(input, route) pair is decoded once and shared between rows that agree (a router that
picks the oracle's adapter costs nothing extra), so the whole table costs little more
than the oracle's own run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..data import Record, prompt_text, read_jsonl
from ..errors import LorastackError
from ..eval import EvalJob, evaluate_many
from ..route import BASE_ROUTE, Route
from ..runtime import Runtime
from ..tasks import TASKS, get_task
from ..tasks.generic import heldout_prompts

COLUMNS = ("in_template", "paraphrase")


def parse_data_args(items: list[str]) -> dict[str, Path]:
    """`NAME=FILE.jsonl` pairs: a user's inputs (with completions) for adapter NAME."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise LorastackError(f"--data {item!r}: expected NAME=FILE.jsonl (an adapter name and its inputs)")
        out[name.strip()] = Path(path.strip())
    return out


def build_inputs(rt: Runtime, tasks: list[str], n: int, data: dict[str, Path], ood_tasks: list[str], n_unrelated: int,
                 seed: int = 1) -> dict[str, Any]:
    """The labelled inputs of each column; records carry `adapter` (the oracle's choice)."""
    served = set(rt.served())
    missing = [t for t in [*tasks, *data] if t not in served]
    if missing:
        raise LorastackError(f"no adapter named {', '.join(missing)} in the library; train them first (lorastack demo --tasks ...)")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise LorastackError(f"{', '.join(unknown)}: not a built-in task; give its inputs with --data NAME=FILE.jsonl")
    columns: dict[str, list[Record]] = {c: [] for c in COLUMNS}
    for t in tasks:
        columns["in_template"] += [{**r, "adapter": t} for r in get_task(t).generate(n, "test", seed=seed)]
        columns["paraphrase"] += [{**r, "adapter": t} for r in get_task(t).generate(n, "paraphrase", seed=seed)]
    for name, path in data.items():
        columns["paraphrase"] += [{**r, "adapter": name} for r in read_jsonl(path)[:n]]
    unrelated = heldout_prompts(n_unrelated)
    per_ood = max(1, n // 2)
    unrelated += [r["prompt"] for t in ood_tasks for r in get_task(t).generate(per_ood, "test", seed=seed)]
    return {"columns": columns, "unrelated": unrelated}


def evaluate_routing(rt: Runtime, tasks: list[str], n: int, ood_tasks: list[str], n_unrelated: int, routers: list[str],
                     out_dir: Path | None = None, seed: int = 1, progress: bool = True, data: dict[str, Path] | None = None,
                     end_task: bool = True, end_task_n: int | None = None) -> dict[str, Any]:
    """Route every column's inputs with each router; then, unless `end_task` is off, decode
    answers for the first `end_task_n` inputs per adapter and column (all when None)."""
    inputs = build_inputs(rt, tasks, n, data or {}, ood_tasks, n_unrelated, seed)
    columns, unrelated = inputs["columns"], inputs["unrelated"]
    result: dict[str, Any] = {"tasks": tasks, "data": {k: str(v) for k, v in (data or {}).items()}, "ood_tasks": ood_tasks,
                              "n": {c: len(columns[c]) for c in COLUMNS} | {"unrelated": len(unrelated)}, "routers": {}}
    routed: dict[str, dict[str, list[Route]]] = {}
    for name in routers:
        router = rt.router(name)
        router.route([unrelated[0]])  # build the index (signatures, calibration) outside the timing
        row: dict[str, Any] = {}
        routed[name] = {}
        t0, count = time.perf_counter(), 0
        for col in COLUMNS:
            recs = columns[col]
            if not recs:
                continue
            ds = router.route([prompt_text(r) for r in recs])
            count += len(recs)
            routed[name][col] = [d.route for d in ds]
            row[f"{col}_top1"] = sum(d.route.names[:1] == [r["adapter"]] for d, r in zip(ds, recs)) / len(recs)
            row[f"{col}_abstained"] = sum(d.abstained for d in ds) / len(recs)
            per: dict[str, float] = {}
            for a in dict.fromkeys(r["adapter"] for r in recs):
                mine = [d for d, r in zip(ds, recs) if r["adapter"] == a]
                per[a] = sum(d.route.names[:1] == [a] for d in mine) / len(mine)
            row[f"{col}_per_adapter"] = per
        du = router.route(unrelated)
        count += len(unrelated)
        row["unrelated_abstained"] = sum(d.abstained for d in du) / len(unrelated)
        captured: dict[str, int] = {}
        for d in du:
            if not d.abstained:
                captured[d.route.names[0]] = captured.get(d.route.names[0], 0) + 1
        row["unrelated_captured_by"] = captured
        row["ms_per_input"] = (time.perf_counter() - t0) * 1000 / max(1, count)
        result["routers"][name] = row
    if end_task:
        result["end_task"] = _end_task(rt, columns, routed, progress, end_task_n)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "routing.json").write_text(json.dumps(result, indent=2))
        _plot(result, out_dir / "routing.png")
    return result


def _end_task(rt: Runtime, columns: dict[str, list[Record]], routed: dict[str, dict[str, list[Route]]],
              progress: bool, per_adapter: int | None = None) -> dict[str, Any]:
    """Exact match per column for base, oracle and each router, decoding each distinct (input, route) once."""
    out: dict[str, Any] = {}
    for col in COLUMNS:
        seen: dict[str, int] = {}
        keep = []
        for i, r in enumerate(columns[col]):
            seen[r["adapter"]] = seen.get(r["adapter"], 0) + 1
            if per_adapter is None or seen[r["adapter"]] <= per_adapter:
                keep.append(i)
        recs = [columns[col][i] for i in keep]
        if not recs:
            continue
        labelled: dict[str, list[Route]] = {"base": [BASE_ROUTE] * len(recs),
                                            "oracle": [Route(((r["adapter"], 1.0),)) for r in recs]}
        labelled |= {f"auto:{name}": [routes[col][i] for i in keep] for name, routes in routed.items() if col in routes}
        pairs: dict[tuple[int, str], int] = {}
        job_recs: list[Record] = []
        job_routes: list[Route] = []
        for routes in labelled.values():
            for i, route in enumerate(routes):
                if (i, str(route)) not in pairs:
                    pairs[(i, str(route))] = len(job_recs)
                    job_recs.append(recs[i])
                    job_routes.append(route)
        res = evaluate_many(rt, [EvalJob(col, job_routes, job_recs)], progress=progress,
                            desc=f"end-task accuracy ({col}, {len(job_recs)} decodes)")[0]
        ok = [row["correct"] for row in res.rows]
        acc = {label: sum(ok[pairs[(i, str(r))]] for i, r in enumerate(routes)) / len(recs) for label, routes in labelled.items()}
        oracle = acc["oracle"]
        per = {a: {label: sum(ok[pairs[(i, str(r))]] for i, r in enumerate(routes) if recs[i]["adapter"] == a) /
                      sum(x["adapter"] == a for x in recs) for label, routes in labelled.items()}
               for a in dict.fromkeys(x["adapter"] for x in recs)}
        out[col] = {"n": len(recs), "accuracy": acc, "relative_to_oracle": {k: (v / oracle if oracle else None) for k, v in acc.items()},
                    "per_adapter": per, "decodes": len(job_recs)}
    return out


def format_table(result: dict[str, Any]) -> list[str]:
    """The table `lorastack eval-routing` prints."""
    n = result["n"]
    lines = [f"{'router':<10} {'in-template top-1':>18} {'paraphrase top-1':>17} {'unrelated abstained':>20} {'ms/input':>9}",
             f"{'':<10} {'(n=' + str(n['in_template']) + ')':>18} {'(n=' + str(n['paraphrase']) + ')':>17} {'(n=' + str(n['unrelated']) + ')':>20}"]
    for name, r in result["routers"].items():
        fmt = lambda k: format(r[k], ".1%") if k in r else "-"  # noqa: E731
        lines.append(f"{name:<10} {fmt('in_template_top1'):>18} {fmt('paraphrase_top1'):>17} {fmt('unrelated_abstained'):>20} "
                     f"{r['ms_per_input']:>9.1f}")
    for col, et in result.get("end_task", {}).items():
        lines.append(f"end-task exact match, {col} (n={et['n']}):")
        for label, acc in et["accuracy"].items():
            rel = et["relative_to_oracle"][label]
            lines.append(f"  {label:<14} {acc:6.1%}" + (f"  ({rel:.0%} of oracle)" if rel is not None else ""))
    return lines


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    routers = list(result["routers"])
    keys = [("in_template_top1", "in-template top-1"), ("paraphrase_top1", "paraphrase top-1"),
            ("unrelated_abstained", "unrelated abstained")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(routers))
    for i, (k, label) in enumerate(keys):
        a1.bar(x + (i - 1) * 0.27, [result["routers"][r].get(k, 0) for r in routers], 0.27, label=label)
    a1.set_xticks(x, routers)
    a1.set_ylim(0, 1.05)
    a1.set_title("routing")
    a1.legend(fontsize=8, loc="lower right")
    et = result.get("end_task", {})
    cols = list(et)
    labels = list(next(iter(et.values()))["accuracy"]) if et else []
    x2 = np.arange(len(labels))
    for i, col in enumerate(cols):
        a2.bar(x2 + (i - 0.5) * 0.4, [et[col]["accuracy"][lab] for lab in labels], 0.4, label=col)
    a2.set_xticks(x2, labels, rotation=20)
    a2.set_ylim(0, 1.05)
    a2.set_title("end-task exact match")
    if cols:
        a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def capture_rate(rt: Runtime, name: str, n: int = 200, router: str | None = None) -> dict[str, Any]:
    """How often `auto` would send generic requests to adapter `name` (and to any adapter):
    a narrow adapter that captures unrelated requests hurts every user of the library."""
    r = rt.router(router)
    prompts = heldout_prompts(n)
    ds = r.route(prompts)
    return {"router": r.name, "n": len(prompts), "captured": sum(d.route.names[:1] == [name] for d in ds),
            "routed": sum(not d.abstained for d in ds)}
