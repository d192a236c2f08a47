"""Teaching the router a wording: a narrow adapter's held-out paraphrases before and after
`lorastack adapters examples NAME --add` with a few requests in one wording it missed.

    python bench/teach_routing.py --library LIB --task sort_words [--keep 0,4] [--teach-template 0[,1,...]] [--k 10]

Works on a copy of LIB (removed at the end). The adapter named after --task keeps 64 stored
examples in 2 of its train phrasings (--keep: the narrow adapter a user trains on a wording or
two; its weights are untouched, routing reads only the examples). The learned router then
routes the task's held-out paraphrases (n per wording, seed 0; wordings never in any train
split), 400 unrelated requests, and the other word tasks' paraphrases. Then K requests in
each held-out wording of --teach-template, with other inputs than the evaluated ones (seed 99), are
added to the adapter's examples and everything is routed again: the taught wording on new
inputs, the wordings not taught, and what the other adapters and the base keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorastack.adapter import EXAMPLES_FILE  # noqa: E402
from lorastack.atomic import scratch_dir  # noqa: E402
from lorastack.library import Library  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402
from lorastack.tasks import get_task  # noqa: E402
from lorastack.tasks.generic import heldout_prompts  # noqa: E402

NEIGHBOURS = ("reverse_words", "sort_words", "title_case")


def measure(router, task: str, para: list[dict], unrelated: list[str], others: dict[str, list[dict]]) -> dict:
    """Top-1 to `task` per held-out wording and overall, what unrelated requests do, and the
    neighbours' own paraphrase top-1."""
    out: dict = {"paraphrase_by_wording": {}}
    for t in sorted({r["template"] for r in para}):
        rs = [r for r in para if r["template"] == t]
        ds = router.route([r["prompt"] for r in rs])
        out["paraphrase_by_wording"][t] = [sum(d.route.names[:1] == [task] for d in ds), len(rs)]
    hit = sum(v[0] for v in out["paraphrase_by_wording"].values())
    out["paraphrase_top1"] = hit / len(para)
    du = router.route(unrelated)
    out["unrelated_to_it"] = sum(d.route.names[:1] == [task] for d in du)
    out["unrelated_abstained"] = sum(d.abstained for d in du) / len(du)
    out["neighbours_paraphrase_top1"] = {
        o: sum(d.route.names[:1] == [o] for d in router.route([r["prompt"] for r in rs])) / len(rs) for o, rs in others.items()}
    return out


def show(label: str, m: dict) -> None:
    words = "  ".join(f"wording {t}: {a}/{b}" for t, (a, b) in m["paraphrase_by_wording"].items())
    near = ", ".join(f"{o} {v:.0%}" for o, v in m["neighbours_paraphrase_top1"].items())
    print(f"{label:44} held-out paraphrases {m['paraphrase_top1']:.1%} ({words}); unrelated: {m['unrelated_to_it']} to it, "
          f"{m['unrelated_abstained']:.1%} abstained; neighbours' paraphrases {near}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", type=Path, required=True, help="a library with an adapter named after --task (copied, not changed)")
    ap.add_argument("--task", default="sort_words")
    ap.add_argument("--keep", default="0,4", help="the 2 train phrasings the narrowed examples keep")
    ap.add_argument("--teach-template", default="0", help="held-out wordings (paraphrase template indices) to teach")
    ap.add_argument("--k", type=int, default=10, help="requests taught per wording")
    ap.add_argument("--n", type=int, default=300, help="held-out paraphrase inputs in all")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    task, keep = get_task(args.task), {int(x) for x in args.keep.split(",")}
    teach = [int(x) for x in args.teach_template.split(",")]

    with scratch_dir("lorastack-teach-") as tmp:
        shutil.copytree(args.library, tmp / "lib")
        lib = Library(tmp / "lib")
        narrow = [r["prompt"] for r in task.generate(3000, "train", seed=5) if r["template"] in keep][:64]
        # Narrowing is this benchmark's set-up, not a user operation: rewrite the file, drop the signatures.
        (lib.get(args.task).path / EXAMPLES_FILE).write_text("".join(json.dumps({"text": t}) + "\n" for t in narrow))
        with lib._db() as con:
            con.execute("DELETE FROM signatures WHERE adapter = ?", (args.task,))
        rt = Runtime.open("embedded", str(lib.root))
        router = rt.router("learned")
        para = task.generate(args.n, "paraphrase", seed=0)
        unrelated = heldout_prompts(400)
        others = {o: get_task(o).generate(100, "paraphrase", seed=0) for o in NEIGHBOURS if o != args.task and o in lib}
        before = measure(router, args.task, para, unrelated, others)
        show(f"{args.task}, examples in phrasings {sorted(keep)}", before)
        seen = {r["prompt"] for r in para}
        pool = [r for r in task.generate(50 * args.k * len(teach), "paraphrase", seed=99) if r["prompt"] not in seen]
        taught = [t for w in teach for t in [r["prompt"] for r in pool if r["template"] == w][: args.k]]
        print(f"teaching {len(taught)} requests in held-out wording(s) {args.teach_template}, e.g. {taught[0]!r}")
        lib.add_examples(args.task, taught)
        after = measure(router, args.task, para, unrelated, others)
        show(f"after teaching {args.k} of wording(s) {args.teach_template}", after)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"teach_routing_{args.task}.json"
    path.write_text(json.dumps({"task": args.task, "keep": sorted(keep), "taught": taught, "before": before, "after": after}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
