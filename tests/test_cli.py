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
    r = subprocess.run([sys.executable, "-m", "lorastack.cli", "tasks", "make", "reverse_words", "--n", "5", "--split", "test",
                        "-o", "-"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and [json.loads(line) for line in r.stdout.splitlines()] == rows, r.stderr  # - is stdout
    assert not (tmp_path / "-").exists()


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
    (["generate", "x", "--temperature", "1e9"], "temperature must be at most 2"),  # the server's range too
    (["generate", "x", "--model", "nosuch"], "unknown adapter 'nosuch'"),  # named before the base loads
    (["generate", "  "], "PROMPT is empty"),  # as the server says
    (["serve", "--port", "70000"], "--port must be between 1 and 65535"),
    (["serve", "--log-level", "bogus"], "--log-level must be one of"),
    (["serve", "--max-batch", "0"], "--max-batch must be >= 1"),  # a 0-row batch would queue every request forever
    (["route", " "], "PROMPT is empty"),
    (["compose", "fewshot", "--data", "nope.jsonl", "--name", "f", "--budget", "0"], "--budget must be >= 1"),  # before the base loads
    (["compose", "fewshot", "--data", "nope.jsonl", "--name", "f", "--l1", "nan"], "--l1 must be a finite number"),
    (["generate", "x", "--model", "auto:0.5+reverse_words:0.5"], "'auto' cannot be part of a mixture"),
    (["adapters", "export", "x", "out", "--dtype", "bfloat16"], "--dtype applies to --merged and --gguf"),
    (["route", "caf\udce9"], "not valid Unicode text"),  # invalid UTF-8 bytes on the command line
    (["adapters", "search", "caf\udce9"], "not valid Unicode text"),
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


def test_bad_training_options_and_output_paths_fail_before_any_work(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 8)
    for args, needle in [(["--rank", "100000"], "rank must be between 1 and 1024"), (["--alpha", "inf"], "alpha must be in (0, 65536]"),
                         (["--lr", "inf"], "lr must be a finite number")]:
        r = run("train", str(data), "--name", "x", *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    for args in (["eval", "--task", "date_format", "--n", "1", "--out", str(tmp_path)],
                 ["tasks", "make", "date_format", "--n", "1", "-o", str(tmp_path)]):
        r = run(*args)
        assert r.returncode == 2 and "is a directory; give a file path" in r.stderr and "Traceback" not in r.stderr, r.stderr


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
    r = run(*common, "generate", "Rewrite the date 2031-04-09 in words", "--max-tokens", "300")  # the tiny base holds 256
    assert r.returncode == 2 and "exceeds the base's context of 256 tokens" in r.stderr and "Traceback" not in r.stderr
    r = run(*common, "generate", "word " * 300, "--max-tokens", "1")  # no --max-tokens can help: say so
    assert r.returncode == 2 and "the prompt alone is" in r.stderr and "shorten it" in r.stderr
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
    # A chat that outgrows the tiny base's 256-token context drops its oldest exchanges and goes on.
    long = "alpha beta gamma delta " * 5
    r = subprocess.run([sys.executable, "-m", "lorastack.cli", *common, "chat", "--max-tokens", "3", "--system", "Be brief."],
                       input=f"{long}\n{long}\n{long}\n{long}\n{long * 5}\n{long}\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "error: prompt is" in r.stderr  # the one message that alone outgrows the context; the chat goes on
    assert r.stdout.count("> ") == 5 and r.stderr.count("oldest messages") == 3 and "oldest messages to fit the base's context of 256 tokens" in r.stderr, r.stderr
    r = run(*common, "adapters", "search", "zzz")
    assert r.returncode == 0 and "no adapter's name or description contains 'zzz'" in r.stderr
    r = run(*common, "generate", "Reverse the order of these words: a b", "--model", "auto", "--explain", "--max-tokens", "2")
    assert r.returncode == 0 and r.stderr.startswith("[route] ")


def _leaf_commands():
    import typer

    from lorastack.cli import app

    def walk(cmd, path):  # typer's groups may be its vendored click's, not click.Group
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    root = typer.main.get_command(app)
    return root, list(walk(root, []))


def test_every_option_and_argument_has_help_and_flags_show_no_value_type():
    from typer.testing import CliRunner

    from lorastack.cli import app

    root, leaves = _leaf_commands()
    missing = [f"{' '.join(path)} {p.name}" for path, cmd in leaves for p in cmd.params if not (getattr(p, "help", None) or "").strip()]
    missing += [f"(global) {p.name}" for p in root.params if not (p.help or "").strip()]
    assert missing == [], missing
    assert len(leaves) >= 28  # the walk reached every command, not just the top group
    runner = CliRunner()
    for path in [[], ["train"], ["adapters", "export"], ["generate"], ["serve"]]:
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        assert "--force" in out or "--debug" in out or "--explain" in out or "--docs" in out, out
        assert "<bool>" not in out, out


def test_train_edit_export_merged_matches_generate_and_json_outputs(tiny_base_dir, tmp_path):
    """The acceptance path: train from TRL-style chat data, export --merged, load with plain
    transformers: the same greedy output as `lorastack generate --model NAME`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorastack.tasks import get_task

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                      {"role": "assistant", "content": r["completion"]}]}) + "\n"
                            for r in get_task("reverse_words").generate(30, "train", 0)))
    common = ["--base", str(tiny_base_dir), "--library", str(tmp_path / "lib"), "--dtype", "float32"]
    r = run(*common, "train", str(data), "--name", "rev", "--steps", "4", "--batch-size", "4", "--rank", "4", "--lr", "0.02",
            "--eval-n", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert "held out 17% (n=5) of 30 records for eval; --eval-n to change" in r.stderr
    out = json.loads(r.stdout)
    assert out["adapter"] == "rev" and out["data"]["n_eval"] == 5 and (tmp_path / "lib" / "adapters" / "rev" / "loss.png").is_file()
    r = run(*common, "adapters", "edit", "rev", "--description", "reverses words", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["description"] == "reverses words", r.stderr
    r = run(*common, "adapters", "export", "rev", str(tmp_path / "hf"), "--merged", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "merged"
    r = run(*common, "adapters", "export", "rev", str(tmp_path / "hf"), "--merged")
    assert r.returncode == 2 and "not empty; use --force" in r.stderr
    prompt = "Reverse the order of these words: apple kiwi plum"
    r = run(*common, "generate", prompt, "--model", "rev", "--max-tokens", "12", "--json", "--show-route")
    assert r.returncode == 0, r.stderr
    gen = json.loads(r.stdout)
    assert gen["route"] == "rev" and gen["abstained"] is False
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert tok.decode(new, skip_special_tokens=True) == gen["text"]
    r = run(*common, "adapters", "rm", "rev", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"removed": "rev", "stacks_using_it": []}
    r = run(*common, "adapters", "import", str(tmp_path / "hf"), "--name", "x")
    assert r.returncode == 2 and "adapter_config.json" in r.stderr and "Traceback" not in r.stderr


def test_auto_prints_the_route_and_eval_reports_accuracy_per_route(tiny_base_dir, tmp_path, isolated_home):
    from lorastack.base import Base
    from lorastack.library import Library
    from lorastack.tasks import get_task
    from test_library import make_peft_adapter

    base = Base.load(str(tiny_base_dir))
    lib = Library(tmp_path / "lib")
    for i, t in enumerate(["reverse_words", "date_format"]):
        lib.add(make_peft_adapter(base, tmp_path / t, seed=i), t, base=base,
                examples=[r["prompt"] for r in get_task(t).generate(24, "train", 0)])
    common = ["--base", str(tiny_base_dir), "--library", str(tmp_path / "lib")]
    r = run(*common, "generate", "Rewrite the date 2031-04-09 in words", "--model", "auto:knn", "--false-route", "1.0",
            "--max-tokens", "2")
    assert r.returncode == 0 and "[route] auto:knn → date_format" in r.stderr, r.stderr
    # A generic request abstains once no false routes are allowed (the tiny base is random, so
    # whether the date request itself clears that bar depends on its vocabulary; a generic one
    # is among the negatives the bar is fitted above).
    r = run(*common, "generate", "What is the capital of France?", "--model", "auto:knn", "--false-route", "0.0",
            "--max-tokens", "2")
    assert r.returncode == 0 and "[route] auto:knn abstained → base" in r.stderr, r.stderr
    r = run(*common, "generate", "hi", "--model", "date_format", "--max-tokens", "2")
    assert r.returncode == 0 and "[route]" not in r.stderr  # a fixed SPEC is what the user asked for
    data = tmp_path / "mixed.jsonl"
    rows = get_task("date_format").generate(3, "test", 0) + get_task("reverse_words").generate(3, "test", 0)
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text('[routing]\ndefault = "knn"\n[routing.knn]\nfalse_route = 1.0\n')
    r = run(*common, "eval", "--model", "auto", "--data", str(data), "--out", str(tmp_path / "res.jsonl"), "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    routes = [json.loads(line)["route"] for line in (tmp_path / "res.jsonl").read_text().splitlines()]
    for route in set(routes):
        assert f"  {route}" in r.stdout and f"/{routes.count(route)} = " in r.stdout, r.stdout


def test_edit_refuses_what_the_card_reader_would_refuse_and_keeps_the_card(tiny_base, tmp_path):
    from lorastack.errors import LorastackError
    from lorastack.library import Library
    from test_library import make_peft_adapter

    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "a", base=tiny_base, card_updates={"description": "old"})
    for bad, needle in [("x" * 5000, "at most 4096"), ("a\x00b", "NUL")]:
        with pytest.raises(LorastackError, match=needle):
            lib.update_card("a", description=bad)
    assert Library(tmp_path / "lib").get("a").card.description == "old"
    r = run("--library", str(tmp_path / "lib"), "adapters", "edit", "a")
    assert r.returncode == 2 and "give --description" in r.stderr


def test_adapters_examples_shows_and_adds_wordings(tiny_base, tmp_path):
    from lorastack.library import Library
    from test_library import make_peft_adapter

    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "a", base=tiny_base, examples=["Reverse: a b"])
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": "say b a backwards"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "flip: x y"}]}) + "\n")
    common = ("--library", str(tmp_path / "lib"), "adapters", "examples", "a")
    r = run(*common, "--add", str(mine), "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"adapter": "a", "added": 2, "stored": 3}, r.stderr
    r = run(*common)
    assert r.returncode == 0 and "a: 3 stored examples" in r.stdout and "'flip: x y'" in r.stdout
    mine.write_text("{not json\n")
    r = run(*common, "--add", str(mine))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    r = run(*common, "--add", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert Library(tmp_path / "lib").get("a").examples() == ["Reverse: a b", "say b a backwards", "flip: x y"]


def test_int8_option_picks_the_int8_path_that_is_faster_here(monkeypatch):
    """`--int8`: int8 matmuls where the compiled kernels run (aten's weight-only GEMV is slower
    than them at 1-4 rows), that GEMV where they do not; nothing without the flag."""
    from lorastack import cli
    from lorastack.engine import native

    monkeypatch.setattr(cli.OPTS, "int8", False)
    assert cli._int8() == {}
    monkeypatch.setattr(cli.OPTS, "int8", True)
    monkeypatch.setattr(native, "kernels", lambda: object())
    assert cli._int8() == {"int8_matmuls": True}
    monkeypatch.setattr(native, "kernels", lambda: None)
    assert cli._int8() == {"int8_rows": 4}


def test_an_interrupted_train_exits_130_not_0(tiny_base_dir, tmp_path, isolated_home, monkeypatch):
    """Ctrl-C during training ends the process with 130 (click hands the command's Exit code
    back instead of raising it when not in standalone mode), so `train ... && export` stops."""
    import lorastack.cli as cli
    import lorastack.train as train_mod

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_to_library", interrupted)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    with pytest.raises(SystemExit) as exc:
        cli.main(["--base", str(tiny_base_dir), "--library", str(tmp_path / "lib"), "train", str(data), "--name", "x",
                  "--steps", "1"])
    assert exc.value.code == 130
