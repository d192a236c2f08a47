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
])
def test_user_errors_have_no_traceback(args, needle):
    r = run(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_jsonl_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    r = run("train", str(bad), "--name", "x")
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
