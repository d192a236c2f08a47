"""Built-in tasks: determinism, disjoint splits, correct answers, scorers."""

from __future__ import annotations

import json
import random
import re
import string

import pytest

from lorastack.errors import NotFoundError
from lorastack.tasks import TASKS, UnknownTaskError, exact_match, get_task, list_tasks, split_of
from lorastack.tasks.number_to_words import spell


def test_at_least_ten_distinct_families():
    tasks = list_tasks()
    assert len(tasks) >= 10
    phrasings = [p for t in tasks for p in t.templates + t.paraphrases]
    assert len(set(phrasings)) == len(phrasings), "every family has its own instructions"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_paraphrase_templates_are_held_out_of_training(name):
    """The paraphrase split uses phrasings no train (or test) record was made from."""
    task = get_task(name)
    assert len(task.templates) >= 6 and len(task.paraphrases) >= 2
    train = task.generate(400, "train", seed=0)
    para = task.generate(200, "paraphrase", seed=0)
    # Every template is actually used, on both sides.
    assert {r["template"] for r in train} == set(range(len(task.templates)))
    assert {r["template"] for r in para} == set(range(len(task.paraphrases)))
    for r in train:
        assert any(_matches(t, r["prompt"]) for t in task.templates)
        assert not any(_matches(t, r["prompt"]) for t in task.paraphrases), r["prompt"]
    for r in para:
        assert any(_matches(t, r["prompt"]) for t in task.paraphrases)
        assert not any(_matches(t, r["prompt"]) for t in task.templates), r["prompt"]
    assert all(task.score(r["completion"], r) for r in para)




def _matches(template, prompt):
    """Whether `prompt` could have been made from `template` (its fixed text, any field values)."""
    regex = "".join(re.escape(lit) + ("(.+?)" if field is not None else "") for lit, field, _, _ in string.Formatter().parse(template))
    return re.fullmatch(regex, prompt, re.S) is not None


def test_answers_are_right():
    for split in ("test", "paraphrase"):
        for r in get_task("add_numbers").generate(50, split, 0):
            a, b = map(int, re.findall(r"\d+", r["prompt"]))
            assert int(r["completion"]) == a + b
    rng = random.Random(0)
    for _ in range(20):
        fields, completion = get_task("reverse_words").make_fields(rng)
        assert completion.split() == fields["words"].split()[::-1]
    for _ in range(50):
        fields, completion = get_task("bracket_close").make_fields(rng)
        seq = fields["seq"].split() + completion.split()
        stack = []
        for ch in seq:
            if ch in "([{<":
                stack.append(ch)
            else:
                assert "([{<"[")]}>".index(ch)] == stack.pop()
        assert not stack
    assert spell(0) == "zero" and spell(40) == "forty" and spell(115) == "one hundred fifteen" and spell(999) == "nine hundred ninety-nine"


def test_json_field_records_vary_as_users_write_them_and_hold_keys_out():
    """Records come compact and spaced, numbers quoted and bare, with many keys; the answer is the
    asked key's value as written; the held-out keys (README measures them) never appear."""
    from lorastack.tasks.json_field import FIELDS, HELDOUT_KEYS

    rng = random.Random(3)
    seen_keys, compact, spaced, bare = set(), 0, 0, 0
    for _ in range(400):
        fields, completion = get_task("json_field").make_fields(rng)
        obj = json.loads(fields["obj"])
        assert str(obj[fields["key"]]) == completion
        seen_keys |= set(obj)
        compact += '":' in fields["obj"].replace('": ', "")
        spaced += '": ' in fields["obj"]
        bare += any(isinstance(v, (int, float)) for v in obj.values())
    assert seen_keys == set(FIELDS) and not seen_keys & set(HELDOUT_KEYS)
    assert min(compact, spaced, bare) > 100, (compact, spaced, bare)


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
    assert get_task("sort_words").generate(3, "paraphrase")
    with pytest.raises(LorastackError, match="n must be"):
        get_task("sort_words").generate(-1)
