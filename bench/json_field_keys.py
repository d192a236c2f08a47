"""json_field on keys it never saw: does the adapter copy the value of whatever key is asked?

    python bench/json_field_keys.py --library LIB [--adapter json_field] [--n 120] [--write DIR]

Built-in json_field records draw their keys from `FIELDS`; this bench asks only for keys in
`HELDOUT_KEYS` (born, due, email, country, zip, level: never generated for any split), inside
records that also hold trained keys, written compact or spaced. Two columns: the task's train
phrasings and its held-out paraphrases, n records each (seed 7). Prints exact match per column
and the first misses; `--write DIR` also saves the records as JSONL, so that `lorastack eval
--model NAME --data DIR/heldout_keys_<column>.jsonl` scores any other adapter on them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorastack.base import Base  # noqa: E402
from lorastack.eval import evaluate  # noqa: E402
from lorastack.library import Library  # noqa: E402
from lorastack.route import parse_spec  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402
from lorastack.tasks import json_field as J  # noqa: E402

COUNTRIES = "Peru Norway Egypt Japan Ecuador Senegal Vietnam Italy Latvia Ukraine Ghana".split()
HELD = {"born": J._date, "due": J._date, "email": lambda r: f"{r.choice(J.FIRST_NAMES).lower()}@example.com",
        "country": lambda r: r.choice(COUNTRIES), "zip": lambda r: f"{r.randint(10000, 99999)}",
        "level": lambda r: r.randint(1, 9)}


def records(n: int, templates: tuple[str, ...], rng: random.Random) -> list[dict[str, str]]:
    """n requests for a held-out key's value, in records that also hold 2-4 trained keys."""
    out = []
    for _ in range(n):
        key = rng.choice(sorted(HELD))
        keys = rng.sample(list(J.FIELDS), rng.randint(2, 4)) + [key]
        rng.shuffle(keys)
        obj = {k: (HELD[k] if k in HELD else J.FIELDS[k])(rng) for k in keys}
        text = json.dumps(obj, separators=rng.choice(J.SPACINGS))
        out.append({"prompt": rng.choice(templates).format(key=key, obj=text), "completion": str(obj[key])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", type=Path, required=True)
    ap.add_argument("--adapter", default="json_field")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    assert set(HELD) == set(J.HELDOUT_KEYS), "keep HELD in step with json_field.HELDOUT_KEYS"
    rng = random.Random(7)
    columns = {"templates": records(args.n, J.TEMPLATES, rng), "paraphrases": records(args.n, J.PARAPHRASES, rng)}
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, recs in columns.items():
            (args.write / f"heldout_keys_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rt = Runtime(Base.load("embedded"), Library(args.library))
    for name, recs in columns.items():
        res = evaluate(rt, parse_spec(args.adapter), recs, progress=False)
        print(f"{args.adapter} on held-out keys, {name}: {res.correct}/{res.n} ({res.accuracy:.1%})", flush=True)
        for row in [r for r in res.rows if not r["correct"]][:3]:
            print(f"  miss: {row['prompt'][:100]!r} -> {row['output']!r} (want {row['expected']!r})")


if __name__ == "__main__":
    main()
