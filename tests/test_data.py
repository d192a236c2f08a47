import json

import pytest

from lorastack.data import messages_of, read_jsonl, split_holdout, validate_record
from lorastack.errors import DataError


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_reads_prompt_and_messages_records(tmp_path):
    p = write(tmp_path, [
        json.dumps({"prompt": "hi", "completion": "yo"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "completion": "c"}),
    ])
    recs = read_jsonl(p)
    assert len(recs) == 2
    assert messages_of(recs[0]) == [{"role": "user", "content": "hi"}]
    assert messages_of(recs[1])[0]["role"] == "system"


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "a", "completion": "b"', "invalid JSON"),
    ('["x"]', "expected a JSON object"),
    ('{"completion": "b"}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": "a"}', "missing 'completion'"),
    ('{"prompt": 3, "completion": "b"}', "'prompt' must be a string"),
    ('{"prompt": "a", "completion": 7}', "'completion' must be a string"),
    ('{"messages": [], "completion": "b"}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}], "completion": "b"}', "role 'robot'"),
    # which answer is the one to learn?
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "completion": "z"}', "keep one answer"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": []}]}', "no text 'content'"),
    ('{"input": "a", "output": 5}', "'output' must be a string"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}], "completion": "b"}', "content parts must all be"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    p = write(tmp_path, [json.dumps({"prompt": "ok", "completion": "ok"}), line])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert f"{p}:2" in str(e.value)
    assert needle in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "e.jsonl")


def test_holdout_split_is_deterministic_and_disjoint():
    recs = [{"prompt": str(i), "completion": str(i)} for i in range(100)]
    a_train, a_eval = split_holdout(recs, 0.1, seed=3)
    b_train, b_eval = split_holdout(recs, 0.1, seed=3)
    assert a_eval == b_eval and len(a_eval) == 10 and len(a_train) == 90
    assert not {r["prompt"] for r in a_train} & {r["prompt"] for r in a_eval}


def test_common_dataset_shapes_load_as_prompt_and_completion(tmp_path):
    p = write(tmp_path, [
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "a"}]}),
        json.dumps({"input": "i", "output": "o", "task": "t"}),
        json.dumps({"instruction": "Do it", "input": "data", "output": "done"}),
        json.dumps({"instruction": "Just do it", "input": "", "output": "ok"}),
    ])
    chat, io, alpaca, bare = read_jsonl(p)
    assert messages_of(chat) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert chat["completion"] == "a"
    assert (io["prompt"], io["completion"], io["task"]) == ("i", "o", "t")
    assert (alpaca["prompt"], alpaca["completion"]) == ("Do it\n\ndata", "done")
    assert bare["prompt"] == "Just do it"


@pytest.mark.parametrize("line,needle", [
    ('{"messages": [{"role": "user", "content": "u"}]}', "must end with an assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "only an assistant turn"),
    ('{"output": "o"}', "needs an 'input' or an 'instruction'"),
    ('{"instruction": 3, "output": "o"}', "must be strings"),
])
def test_shape_errors_name_file_and_line(tmp_path, line, needle):
    p = write(tmp_path, ['{"prompt": "a", "completion": "b"}', line])
    with pytest.raises(DataError, match=f"{p}:2: .*{needle}"):
        read_jsonl(p)


def test_every_bad_line_is_reported_at_once_up_to_a_limit(tmp_path):
    from lorastack.errors import DataError

    good = '{"prompt": "a", "completion": "b"}\n'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + '{"prompt": "a"\n' + good + '{"completion": "x"}\n' + "[1]\n")
    with pytest.raises(DataError) as e:
        read_jsonl(bad)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{bad}: 3 bad lines:"
    assert [ln.strip().split(":")[1] for ln in lines[1:]] == ["2", "4", "5"]
    many = tmp_path / "many.jsonl"
    many.write_text(good + "nope\n" * 25)
    with pytest.raises(DataError) as e:
        read_jsonl(many)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{many}: 25 bad lines:" and len(lines) == 22 and lines[-1] == "  … and 5 more"
    assert lines[1].startswith(f"  {many}:2: invalid JSON")


def test_all_turns_learns_every_assistant_reply_in_its_own_context(tmp_path):
    from lorastack.data import every_assistant_turn, read_jsonl

    path = tmp_path / "chat.jsonl"
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    path.write_text(json.dumps({"messages": convo}) + "\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    records = read_jsonl(path)
    assert [r["completion"] for r in records] == ["4", "c"]  # by default: the last turn only
    expanded = every_assistant_turn(records)
    assert [(len(r.get("messages", [])), r["completion"]) for r in expanded] == [(2, "hello"), (4, "4"), (0, "c")]
    assert expanded[0]["messages"] == convo[:2] and expanded[1]["messages"] == convo[:4]


def test_openai_content_parts_are_joined_as_the_server_reads_them(tmp_path):
    p = write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Reverse: "},
                                                                               {"type": "text", "text": "a b"}]},
                                                  {"role": "assistant", "content": [{"type": "text", "text": "b a"}]}]})])
    (r,) = read_jsonl(p)
    assert r["messages"] == [{"role": "user", "content": "Reverse: a b"}] and r["completion"] == "b a"


def test_all_turns_hold_out_whole_conversations():
    from lorastack.data import every_assistant_turn

    chats = [{"messages": [{"role": "user", "content": f"q{i}a"}, {"role": "assistant", "content": f"a{i}a"},
                           {"role": "user", "content": f"q{i}b"}, {"role": "assistant", "content": f"a{i}b"}]} for i in range(20)]
    records = every_assistant_turn([validate_record(c, "x") for c in chats])
    assert len(records) == 40
    train, held = split_holdout(records, 0.1, seed=0)
    convs = lambda rs: {r["conversation"] for r in rs}  # noqa: E731
    assert held and not convs(train) & convs(held) and len(held) % 2 == 0
