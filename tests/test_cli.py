"""The CLI reports user errors in one line, with no traceback, and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lorastack.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_tasks_list_and_make(tmp_path):
    r = run("tasks", "list")
    assert r.returncode == 0 and "reverse_words" in r.stdout
    out = tmp_path / "d.jsonl"
    r = run("tasks", "make", "reverse_words", "--n", "5", "--split", "test", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(row["task"] == "reverse_words" for row in rows)


@pytest.mark.parametrize("args,needle", [
    (["tasks", "make", "revers_words"], "did you mean 'reverse_words'"),
    (["adapters", "show", "nope"], "unknown adapter 'nope'"),
    (["adapters", "rm", "../etc"], "adapter name"),
    # usage mistakes, caught whichever click (click's or typer's vendored copy) raised them
    (["frobnicate"], "No such command"),
    (["generate"], "Missing argument"),
    (["generate", "x", "--foo"], "No such option"),
    (["generate", "x", "--max-tokens", "abc"], "--max-tokens"),
    ([], "Usage"),
    (["eval", "--task", "date_format", "--n", "0"], "--n must be >= 1"),
    (["generate", "x", "--model", "a:1e9"], "at most 10"),
])
def test_user_errors_have_no_traceback(args, needle):
    r = run(*args)
    assert r.returncode == 2
    assert needle in r.stderr + r.stdout  # help for a bare `lorastack` goes to stdout
    assert "Traceback" not in r.stderr + r.stdout


def test_serve_on_a_busy_port_fails_at_once_without_announcing_a_url():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run("serve", "--port", str(busy.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr
    assert "serving" not in r.stdout and "Traceback" not in r.stderr


def test_malformed_jsonl_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    r = run("train", str(bad), "--name", "x")
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
    assert "at column 15" in r.stderr  # the column on that line, not "column 1" of a phantom next line


def test_route_generate_and_eval_commands_on_a_tiny_base(tiny_base_dir, tmp_path, isolated_home):
    """`route`, `generate`, `eval --model auto` and `adapters list` end to end through the CLI."""
    from lorastack.base import Base
    from lorastack.library import Library
    from lorastack.tasks import get_task
    from test_library import make_peft_adapter

    base = Base.load(str(tiny_base_dir))
    lib_dir = tmp_path / "lib"
    lib = Library(lib_dir)
    for i, t in enumerate(["reverse_words", "date_format"]):
        lib.add(make_peft_adapter(base, tmp_path / t, seed=i), t, base=base,
                examples=[r["prompt"] for r in get_task(t).generate(24, "train", 0)])
    common = ["--base", str(tiny_base_dir), "--library", str(lib_dir)]
    # The tiny random model's embeddings are not semantic enough for the default 1% false-route
    # operating point; the loosest one routes whenever an adapter beats "no expert".
    r = run(*common, "route", "Rewrite the date 2031-04-09 in words", "--json", "--false-route", "1.0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["spec"] == "date_format" and out["scores"]["date_format"] > 0.5
    assert out["confidence"] >= out["threshold"] and out["candidate"] == "date_format"
    r = run(*common, "generate", "Rewrite the date 2031-04-09 in words", "--model", "auto:knn", "--explain", "--false-route", "1.0",
            "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "[route] date_format: routed: best candidate date_format by examples, confidence" in r.stderr
    r = run(*common, "generate", "Rewrite the date 2031-04-09 in words", "--model", "date_format:0.5+reverse_words:0.5", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "mixed.jsonl"
    rows = get_task("date_format").generate(3, "test", 0) + get_task("reverse_words").generate(3, "test", 0)
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    res = tmp_path / "res.jsonl"
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text('[routing]\ndefault = "knn"\n[routing.knn]\nfalse_route = 1.0\n')  # router and operating point from config
    r = run(*common, "eval", "--model", "auto", "--data", str(data), "--out", str(res), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 6
    routes = [json.loads(line)["route"] for line in res.read_text().splitlines()]
    want = ["date_format"] * 3 + ["reverse_words"] * 3
    # Per-example routes are recorded; the tiny random model routes most, not all, of the varied phrasings.
    assert set(routes) <= {"date_format", "reverse_words", "base"} and sum(a == b for a, b in zip(routes, want)) >= 4, routes
    r = run(*common, "generate", "hi", "--model", "date_fromat")
    assert r.returncode == 2 and "did you mean 'date_format'" in r.stderr


def test_chat_slash_commands_search_message_and_show_route(tiny_base_dir, tmp_path):
    from lorastack.base import Base
    from lorastack.library import Library
    from test_library import make_peft_adapter

    base = Base.load(str(tiny_base_dir))
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(base, tmp_path / "rw"), "reverse_words", base=base,
            examples=["Reverse the order of these words: a b c", "Reverse the order of these words: x y"])
    common = ["--base", str(tiny_base_dir), "--library", str(tmp_path / "lib")]
    script = "/help\n/route\n/model nope\n/frob\nhello there\n/model reverse_words\nhello\n/clear\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "lorastack.cli", *common, "chat", "--max-tokens", "3"], input=script,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "/model SPEC" in r.stderr and "route display on" in r.stderr
    assert "unknown adapter 'nope'" in r.stderr and "unknown command '/frob'" in r.stderr
    assert "now chatting with reverse_words" in r.stderr and "[route] reverse_words" in r.stderr
    assert "history cleared" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.count("> ") == 2  # two model replies; the commands never reached the model
    r = run(*common, "adapters", "search", "zzz")
    assert r.returncode == 0 and "no adapter's name or description contains 'zzz'" in r.stderr
    r = run(*common, "generate", "Reverse the order of these words: a b", "--model", "auto", "--explain", "--max-tokens", "2")
    assert r.returncode == 0 and r.stderr.startswith("[route] ")
