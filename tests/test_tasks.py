"""Built-in tasks: determinism, disjoint splits, correct answers, scorers."""

from __future__ import annotations

import json

import pytest

from lorastack.errors import NotFoundError
from lorastack.tasks import TASKS, UnknownTaskError, exact_match, get_task, list_tasks, split_of
from lorastack.tasks.number_to_words import spell


def test_at_least_ten_distinct_families():
    tasks = list_tasks()
    assert len(tasks) >= 10
    prefixes = {t.generate(1, "train", 0)[0]["prompt"].split()[0:3].__str__() for t in tasks}
    assert len(prefixes) == len(tasks), "every family has its own instruction"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_deterministic_and_splits_are_disjoint(name):
    task = get_task(name)
    a = task.generate(300, "train", seed=3)
    assert a == task.generate(300, "train", seed=3)
    assert a != task.generate(300, "train", seed=4)
    test = task.generate(100, "test", seed=3)
    assert {r["prompt"] for r in a}.isdisjoint({r["prompt"] for r in test})
    assert all(split_of(r["prompt"]) == "test" for r in test)
    assert all(r["task"] == name and r["completion"] for r in a + test)
    # Every generated answer passes the task's own scorer, and a wrong one fails it.
    assert all(task.score(r["completion"], r) for r in test)
    assert not any(task.score(r["completion"] + " extra", r) for r in test)
    json.dumps(a)  # records are plain JSON


def test_answers_are_right():
    rec = get_task("add_numbers").generate(50, "test", 0)
    for r in rec:
        a, b = r["prompt"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(r["completion"]) == int(a) + int(b)
    for r in get_task("reverse_words").generate(20, "test", 0):
        assert r["completion"].split() == r["prompt"].split(": ", 1)[1].split()[::-1]
    for r in get_task("bracket_close").generate(50, "test", 0):
        seq = r["prompt"].split(": ", 1)[1].split() + r["completion"].split()
        stack = []
        for ch in seq:
            if ch in "([{<":
                stack.append(ch)
            else:
                assert "([{<"[")]}>".index(ch)] == stack.pop()
        assert not stack
    assert spell(0) == "zero" and spell(40) == "forty" and spell(115) == "one hundred fifteen" and spell(999) == "nine hundred ninety-nine"


def test_exact_match_ignores_surrounding_whitespace_only():
    rec = {"completion": "Paris Lima"}
    assert exact_match(" Paris  Lima\n", rec)
    assert not exact_match("paris lima", rec)
    assert not exact_match("Paris", rec)


def test_unknown_task_names_close_matches():
    with pytest.raises(UnknownTaskError, match="did you mean 'sort_words'") as e:
        get_task("sort_word")
    assert isinstance(e.value, NotFoundError)


def test_bad_split_and_n():
    from lorastack.errors import LorastackError

    with pytest.raises(LorastackError, match="split must be"):
        get_task("sort_words").generate(3, "dev")
    with pytest.raises(LorastackError, match="n must be"):
        get_task("sort_words").generate(-1)
