import pytest

from lorastack.route import AutoSpec, Route, SpecError, parse_spec


def test_simple_specs():
    assert parse_spec("base").is_base
    assert parse_spec("reverse_words") == Route((("reverse_words", 1.0),))
    assert parse_spec("auto") == AutoSpec(None)
    assert parse_spec("auto:knn") == AutoSpec("knn")


def test_mixture_round_trips():
    r = parse_spec("a:0.7+b:0.3")
    assert r.entries == (("a", 0.7), ("b", 0.3))
    assert str(r) == "a:0.7+b:0.3"
    assert parse_spec(str(r)) == r


@pytest.mark.parametrize("spec,needle", [
    ("", "empty model spec"),
    ("a:x+b:1", "is not a number"),
    ("a:0.5+b", "needs a weight"),
    ("a:-1", "positive"),
    ("a:0", "positive"),
    ("a:nan", "positive"),
    ("a:1+a:2", "appears twice"),
    ("a:1++b:1", "empty term"),
    (":0.5", "without an adapter name"),
    ("a:1e9", "at most 10"),
])
def test_bad_specs_name_the_problem(spec, needle):
    with pytest.raises(SpecError, match=needle):
        parse_spec(spec)
