"""eval-routing's three columns and end-task table, user data, and `router calibrate`, on the tiny base."""

from __future__ import annotations

import json

import pytest

from lorastack.errors import LorastackError
from lorastack.tasks import get_task
from test_routing import TASKS, routed_runtime  # noqa: F401  (fixture)


def test_eval_routing_reports_three_columns_end_task_and_user_data(routed_runtime, tmp_path):  # noqa: F811
    from lorastack.routing.evaluate import evaluate_routing, format_table

    rt = routed_runtime
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"prompt": f"Please reverse: {w}", "completion": " ".join(reversed(w.split()))}) + "\n"
                            for w in ["red green blue", "one two three four"]))
    res = evaluate_routing(rt, ["date_format", "add_numbers"], 3, ["bool_eval"], 10, ["knn", "learned"], tmp_path / "out",
                           progress=False, data={"reverse_words": mine})
    assert res["n"] == {"in_template": 6, "paraphrase": 6 + 2, "unrelated": 10 + 1}
    for name in ("knn", "learned"):
        row = res["routers"][name]
        for k in ("in_template_top1", "paraphrase_top1", "unrelated_abstained"):
            assert 0.0 <= row[k] <= 1.0
        assert set(row["paraphrase_per_adapter"]) == {"date_format", "add_numbers", "reverse_words"}
    for col in ("in_template", "paraphrase"):
        acc = res["end_task"][col]["accuracy"]
        assert set(acc) == {"base", "oracle", "auto:knn", "auto:learned"}
        # Shared decodes: no more than one per distinct (input, route) pair.
        assert res["end_task"][col]["decodes"] <= res["n"][col] * 4
    saved = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert saved["routers"].keys() == res["routers"].keys() and (tmp_path / "out" / "routing.png").stat().st_size > 1000
    lines = format_table(res)
    assert "paraphrase top-1" in lines[0] and any(line.startswith("knn") for line in lines)


def test_eval_routing_input_errors_are_one_line(routed_runtime):  # noqa: F811
    from lorastack.routing.evaluate import evaluate_routing, parse_data_args

    with pytest.raises(LorastackError, match="NAME=FILE.jsonl"):
        parse_data_args(["reverse_words"])
    with pytest.raises(LorastackError, match="no adapter named sort_words"):
        evaluate_routing(routed_runtime, ["sort_words"], 2, [], 2, ["knn"], progress=False)


def test_router_calibrate_fits_the_users_phrasings_and_lapses_when_the_library_changes(routed_runtime, tmp_path, tiny_base):  # noqa: F811
    from lorastack.routing.calibrate import calibrate_on_data
    from test_library import make_peft_adapter

    rt = routed_runtime
    rows = [{"prompt": r["prompt"], "adapter": t} for t in TASKS for r in get_task(t).generate(6, "paraphrase", 3)]
    rows += [{"prompt": p, "adapter": None} for p in ["Who painted the Mona Lisa?", "Name three rivers in Africa."]]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = calibrate_on_data(rt, "knn", data)
    assert info["accuracy"] >= info["accuracy_before"] and info["n"] == len(rows)
    router = rt.router("knn")
    assert router.threshold() == info["threshold"]
    assert router.threshold(0.5) != info["threshold"] or info["threshold"] == router.index().calibration.threshold(0.5)
    # A fresh router (a new process) reads the saved threshold.
    from lorastack.routing.knn import KnnRouter

    assert KnnRouter(rt).threshold() == info["threshold"]
    # Adding an adapter changes what "close enough" means: the override lapses.
    src = make_peft_adapter(tiny_base, tmp_path / "bool", seed=9)
    rt.library.add(src, "bool_eval", base=tiny_base, examples=[r["prompt"] for r in get_task("bool_eval").generate(16, "train", 0)])
    fresh = KnnRouter(rt)
    assert fresh.threshold() == fresh.index().calibration.threshold(fresh.false_route)
    # The learned gate had a threshold per adapter (the shared one, lowered where its negatives
    # sit lower); the report names each, and the calibrated threshold then holds for all.
    info = calibrate_on_data(rt, "learned", data)
    gate = rt.router("learned")
    per = info["thresholds_before"]
    assert sorted(per) == sorted(gate.routable()) and all(t <= info["threshold_before"] + 1e-9 for t in per.values()), info
    assert all(gate.threshold(adapter=i) == info["threshold"] for i in range(len(per)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "adapter": "nope"}) + "\n")
    with pytest.raises(LorastackError, match="'nope' is not in the library"):
        calibrate_on_data(rt, "knn", bad)
    with pytest.raises(LorastackError, match="no calibrated threshold"):
        calibrate_on_data(rt, "arrow", data)


def test_capture_rate_counts_generic_requests_sent_to_an_adapter(routed_runtime, capsys):  # noqa: F811
    from lorastack.cli import _report_capture
    from lorastack.routing.evaluate import capture_rate

    rt = routed_runtime
    info = capture_rate(rt, "date_format", n=30, router="knn")
    assert info["n"] == 30 and 0 <= info["captured"] <= info["routed"] <= 30 and info["router"] == "knn"
    assert capture_rate(rt, "date_format", n=30, router="knn") == info  # deterministic
    _report_capture(rt.base, rt.library, "date_format")
    assert "unrelated generic requests to date_format" in capsys.readouterr().out
