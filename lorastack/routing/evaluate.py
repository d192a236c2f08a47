"""Routing evaluation: does each input reach the right expert, and what does that buy?

A held-out stream mixes the test splits of the library's task adapters with inputs from
tasks that have no adapter (out-of-library). Reported: per-router top-1 routing accuracy,
abstention on out-of-library inputs (recall: share of them sent to the base; precision:
share of abstentions that were out-of-library), routing latency, and end-task exact match
on the in-library inputs for the base, the oracle (each input's own adapter), each router,
and a uniform mixture of all adapters.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..eval import EvalJob, evaluate_many
from ..route import BASE_ROUTE, Route
from ..runtime import Runtime
from ..tasks import get_task


def evaluate_routing(rt: Runtime, tasks: list[str], n: int, ood_tasks: list[str], n_ood: int, routers: list[str],
                     out_dir: Path | None = None, seed: int = 1, progress: bool = True) -> dict[str, Any]:
    missing = [t for t in tasks if t not in rt.library.names()]
    if missing:
        from ..errors import LorastackError

        raise LorastackError(f"no adapter named after task(s) {', '.join(missing)}; train them first (lorastack demo --tasks ...)")
    inside = [r for t in tasks for r in get_task(t).generate(n, "test", seed=seed)]
    outside = [r for t in ood_tasks for r in get_task(t).generate(max(1, n_ood // max(1, len(ood_tasks))), "test", seed=seed)]
    prompts_in = [r["prompt"] for r in inside]
    prompts_out = [r["prompt"] for r in outside]
    result: dict[str, Any] = {"tasks": tasks, "ood_tasks": ood_tasks, "n_per_task": n, "n_ood": len(outside), "routers": {}}
    routed: dict[str, list[Route]] = {}
    for name in routers:
        router = rt.router(name)
        router.route(prompts_in[:1])  # build the index (signatures) outside the timing
        t0 = time.perf_counter()
        d_in = router.route(prompts_in)
        d_out = router.route(prompts_out) if prompts_out else []
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(prompts_in) + len(prompts_out))
        top1 = sum(d.route.names[:1] == [r["task"]] for d, r in zip(d_in, inside)) / len(inside)
        abstain_out = sum(d.abstained for d in d_out)
        abstain_in = sum(d.abstained for d in d_in)
        per_task = {t: sum(d.route.names[:1] == [t] for d, r in zip(d_in, inside) if r["task"] == t) / n for t in tasks}
        result["routers"][name] = {
            "top1_accuracy": top1, "per_task_top1": per_task, "ms_per_input": ms,
            "ood_abstention_recall": abstain_out / len(d_out) if d_out else None,
            "abstention_precision": abstain_out / (abstain_out + abstain_in) if abstain_out + abstain_in else None,
            "in_library_abstained": abstain_in,
        }
        routed[name] = [d.route for d in d_in]
    oracle = [Route(((r["task"], 1.0),)) for r in inside]
    uniform = Route(tuple((t, round(1.0 / len(tasks), 6)) for t in tasks))
    labels = ["base", "oracle", *[f"auto:{n}" for n in routers], "uniform mix"]
    route_sets: list[Route | list[Route]] = [BASE_ROUTE, oracle, *[routed[n] for n in routers], uniform]
    jobs = [EvalJob(label, rs, inside) for label, rs in zip(labels, route_sets)]
    results = evaluate_many(rt.generator, jobs, progress=progress, desc="end-task accuracy")
    result["end_task_accuracy"] = {label: res.accuracy for label, res in zip(labels, results)}
    oracle_acc = result["end_task_accuracy"]["oracle"]
    result["relative_to_oracle"] = {k: (v / oracle_acc if oracle_acc else None) for k, v in result["end_task_accuracy"].items()}
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "routing.json").write_text(json.dumps(result, indent=2))
        _plot(result, out_dir / "routing.png")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result["end_task_accuracy"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(list(acc), list(acc.values()), color="tab:blue")
    a1.set_ylim(0, 1)
    a1.set_title("end-task exact match (in-library inputs)")
    a1.tick_params(axis="x", rotation=30)
    routers = result["routers"]
    a2.bar([f"{n} top-1" for n in routers], [r["top1_accuracy"] for r in routers.values()], color="tab:green")
    a2.bar([f"{n} OOD abstain" for n in routers], [r["ood_abstention_recall"] or 0 for r in routers.values()], color="tab:orange")
    a2.set_ylim(0, 1)
    a2.set_title("routing")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
