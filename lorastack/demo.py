"""The main job, as a script over the public API: one expert per task, then the matrix.

Rows are the bare base and each adapter; columns are tasks. A high diagonal and a low
off-diagonal is the reason routing exists: each expert is good at its own task only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .base import Base
from .errors import LorastackError
from .eval import EvalJob, evaluate_many
from .library import Library
from .plots import heatmap
from .route import BASE_ROUTE, Route
from .runtime import Runtime
from .tasks import get_task
from .train import TrainConfig, train_to_library

# Enough data and steps for every demo task to pass 80% on the embedded base (measured;
# see README). Steps are few because the tasks are narrow.
DEMO_TRAIN = TrainConfig(rank=16, alpha=32, steps=80, batch_size=8, lr=1e-3, seed=0)
DEMO_N_TRAIN = 1000


def _needs_training(library: Library, name: str, task: str, fingerprint: str, retrain: bool) -> bool:
    if retrain or name not in library.names():
        return True
    card = library.get(name).card
    if card.data.get("task") != task:
        raise LorastackError(f"adapter {name!r} exists but was not trained on task {task!r}; remove it or use --retrain")
    return card.base_fingerprint != fingerprint


def run_demo(
    tasks: list[str],
    n_test: int = 200,
    out_dir: Path = Path("out/demo"),
    retrain: bool = False,
    base_source: str = "embedded",
    library_dir: Path | None = None,
    dtype: str | None = None,
    int8_rows: int = 0,
    int8_matmuls: bool = False,
) -> dict:
    console = Console(stderr=True)
    t_start = time.perf_counter()
    task_objs = [get_task(t) for t in tasks]
    library = Library(library_dir)
    runtime = Runtime(Base.load(base_source, dtype=dtype), library, int8_rows=int8_rows, int8_matmuls=int8_matmuls)
    console.print(f"base: {runtime.base.name} [{runtime.base.fingerprint}] loaded in {runtime.base.load_seconds:.1f}s")

    todo = [t for t in task_objs if _needs_training(library, t.name, t.name, runtime.base.fingerprint, retrain)]
    if todo:
        train_base = Base.load(base_source, dtype="float32")  # training keeps float32 master weights
        for task in todo:
            console.print(f"training adapter [bold]{task.name}[/] ({DEMO_TRAIN.steps} steps)")
            adapter = train_to_library(
                train_base, library, task.generate(DEMO_N_TRAIN, "train", seed=0), task.name, DEMO_TRAIN,
                description=task.description, data_info={"task": task.name, "source": "lorastack.tasks"},
                scorer=task.score, overwrite=True,
            )
            tr = adapter.card.training
            console.print(f"  {tr['steps']} steps, {tr['seconds']:.0f}s, {tr['tokens_per_s']:.0f} tok/s, "
                          f"held-out EM {adapter.card.metrics.get('eval_exact_match', float('nan')):.0%}")
        del train_base
    else:
        console.print("all demo adapters found in the library; reusing them (use --retrain to train again)")
    # Store routing signatures and fit the gate now, so a first `--model auto` only embeds its request.
    runtime.router().route(["Hello!"])

    routes: list[tuple[str, Route]] = [("base", BASE_ROUTE)] + [(t.name, runtime.route(t.name)) for t in task_objs]
    tests = {t.name: t.generate(n_test, "test", seed=0) for t in task_objs}
    jobs = [EvalJob(f"{label} on {task.name}", route, tests[task.name], task.score) for label, route in routes for task in task_objs]
    t_eval = time.perf_counter()
    results = evaluate_many(runtime, jobs, desc=f"evaluating {len(routes)} models x {len(task_objs)} tasks")
    eval_seconds = time.perf_counter() - t_eval
    matrix = [[results[i * len(task_objs) + j].accuracy for j in range(len(task_objs))] for i in range(len(routes))]
    rows_out = [{"model": label, **row} for i, (label, _) in enumerate(routes)
                for res in results[i * len(task_objs) : (i + 1) * len(task_objs)] for row in res.rows]
    tokens = sum(r.completion_tokens for r in results)
    console.print(f"evaluated {sum(r.n for r in results)} examples in {eval_seconds:.0f}s ({tokens / eval_seconds:.0f} generated tok/s)")

    table = Table(title=f"exact match on {n_test} held-out test examples per task")
    table.add_column("model \\ task")
    for t in task_objs:
        table.add_column(t.name, justify="right")
    for (label, _), row in zip(routes, matrix):
        table.add_row(label, *[f"{v:.1%}" for v in row])
    Console(width=max(100, 18 + 16 * len(task_objs))).print(table)

    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "base": runtime.base.info(),
        "tasks": [t.name for t in task_objs],
        "models": [label for label, _ in routes],
        "matrix": matrix,
        "n_test": n_test,
        "int8": {"rows": int8_rows, "matmuls": int8_matmuls},
        "trained": [t.name for t in todo],
        "seconds": round(time.perf_counter() - t_start, 1),
        "eval_seconds": round(eval_seconds, 1),
    }
    (out_dir / "matrix.json").write_text(json.dumps(result, indent=2))
    with open(out_dir / "examples.jsonl", "w") as fh:
        for r in rows_out:
            fh.write(json.dumps(r) + "\n")
    heatmap(matrix, result["models"], result["tasks"], out_dir / "matrix.png", "lorastack demo: adapter x task exact match")
    console.print(f"wrote {out_dir}/matrix.json, matrix.png, examples.jsonl in {result['seconds']:.0f}s")
    return result
