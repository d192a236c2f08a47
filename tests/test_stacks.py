"""Stacks on the tiny model: spec validation, template rendering, DAG order, parsers,
traces, stage batching through the engine, storage, and stack/<name> in the server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from lorastack.engine.sampling import Sampling
from lorastack.library import Library
from lorastack.route import StackRef, parse_spec
from lorastack.runtime import Runtime
from lorastack.stacks import StackError, StackRunner, StackStore, load_stack, parse_stack
from lorastack.stacks.spec import Template, waves
from test_library import make_peft_adapter

SMALLEST = """
name: date-from-record
stages:
  - name: extract
    prompt: 'What is the value of "born" in {input}?'
    model: json_field
  - name: words
    prompt: "Rewrite the date {stages.extract.output} in words"
    model: date_format
"""


@pytest.fixture()
def runtime(tiny_base, tmp_path) -> Runtime:
    lib = Library(tmp_path / "lib")
    for i, name in enumerate(("json_field", "date_format", "reverse_words")):
        lib.add(make_peft_adapter(tiny_base, tmp_path / "src" / name, seed=i), name, base=tiny_base)
    return Runtime(tiny_base, lib, max_batch=16)


def spec_of(yaml_text: str):
    import yaml

    return parse_stack(yaml.safe_load(textwrap.dedent(yaml_text)))


# ------------------------------------------------------------------ spec
def test_smallest_spec_parses_in_order(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SMALLEST)
    spec = load_stack(path)
    assert spec.name == "date-from-record" and spec.output == "words"
    assert spec.order == (("extract",), ("words",))
    assert [s.kind for s in spec.stages] == ["model", "model"]


@pytest.mark.parametrize("body, needle", [
    ("stages:\n  - {name: a, prompt: 'x {stages.b.output}', model: base}", "there is no stage 'b'"),
    ("stages:\n  - {name: a, prompt: 'x {stages.b.output}', model: base}\n  - {name: b, prompt: 'y {stages.a.output}', model: base}",
     "form a cycle"),
    ("stages:\n  - {name: a, prompt: 'x {inptu}', model: base}", "bad placeholder '{inptu}'"),
    ("stages:\n  - {name: a, prompt: 'x {stages.a.outptu}', model: base}", "bad placeholder"),
    ("stages:\n  - {name: a, prompt: 'x {item}', model: base}", "only defined inside a map stage"),
    ("stages:\n  - {name: a, prompt: 'x', parse: {regex: '(['}}", "does not compile"),
    ("stages:\n  - {name: a, prompt: 'x', parse: {frobnicate: 1}}", "unknown parser 'frobnicate'"),
    ("stages:\n  - {name: a, prompt: 'x', model: base}\n  - {name: a, prompt: 'y', model: base}", "two stages are named 'a'"),
    ("stages:\n  - {name: a, prompt: 'x', map: '{input}'}", "a map stage needs a model"),
    ("stages:\n  - {name: a, prompt: 'x', modle: base}", "unknown key 'modle'"),
    ("stages: []", "non-empty list"),
    ("stages:\n  - {name: a, prompt: 'x', model: base}\noutput: b", "output 'b' is not a stage"),
    ("stages:\n  - {name: '1a', prompt: 'x', model: base}", "stage name"),
])
def test_spec_validation_errors_are_one_line(body, needle):
    with pytest.raises(StackError, match=re.escape(needle)) as e:
        spec_of("name: s\n" + body)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_bad_name_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nstages: [\n")
    with pytest.raises(StackError, match=f"{bad}:.*not valid YAML"):
        load_stack(bad)
    with pytest.raises(StackError, match="name"):
        spec_of("name: '../x'\nstages:\n  - {name: a, prompt: x}")


def test_templates_render_placeholders_and_keep_other_braces():
    t = Template.parse('In {"a": 1} find {stages.x.output} from {input}', "t")
    assert t.refs == ("x",)
    assert t.render("IN", {"x": "X"}) == 'In {"a": 1} find X from IN'


def test_dag_waves_run_independent_stages_together():
    spec = spec_of("""
        name: dag
        stages:
          - {name: left, prompt: '{input}', model: base}
          - {name: right, prompt: '{input}', model: base}
          - {name: both, prompt: '{stages.left.output} {stages.right.output}'}
    """)
    assert waves(spec.stages) == (("left", "right"), ("both",))


def test_parsers_regex_json_split_join_first_line_strip():
    spec = spec_of(r"""
        name: p
        stages:
          - name: num
            prompt: '{input}'
            parse: [{regex: 'total (\d+)'}]
          - name: field
            prompt: '{input}'
            parse: {json_field: born}
          - name: parts
            prompt: '{input}'
            parse: [{split: ','}, strip, {join: ' | '}]
          - name: first
            prompt: "\n  hello  \nworld"
            parse: [first_line]
    """)
    assert spec.stage("num").finish("the total 42 units") == "42"
    assert spec.stage("num").finish("nothing") == ""
    assert spec.stage("field").finish('{"born": "2001-02-03", "x": 1}') == "2001-02-03"
    assert spec.stage("field").finish("not json") == ""
    assert spec.stage("parts").finish(" a, b ,c ") == "a | b | c"
    assert spec.stage("first").finish("\n  hello  \nworld") == "hello"


def test_chars_parser_splits_into_letters_for_a_map_stage_and_takes_no_argument(runtime):
    spec = spec_of(r"""
        name: c
        stages:
          - name: letters
            prompt: '{input}'
            parse: [{replace: [' ', '_']}, chars]
          - name: each
            map: '{stages.letters.output}'
            prompt: 'Letter: {item}'
            model: base
            max_tokens: 1
          - name: words
            prompt: 'ab cd, e f'
            parse: [{split: ','}, chars, {join: '.'}]
    """)
    letters = spec.stage("letters")
    assert letters.finish("ab c") == "a\nb\n_\nc"
    assert letters.finish("") == ""
    assert spec.stage("words").finish("ab cd, e f") == "a.b.c.d.e.f"  # a list's items, flattened, whitespace dropped
    res = StackRunner(runtime).run(spec, "hi yo")
    assert res.error is None and res.trace[1].input == [f"Letter: {c}" for c in "hi_yo"]
    with pytest.raises(StackError, match="chars takes no argument"):
        spec_of("name: c\nstages:\n  - {name: t, prompt: '{input}', parse: {chars: x}}")


# ------------------------------------------------------------------ running
def test_transform_stages_run_without_the_model_and_traces_say_so(runtime):
    spec = spec_of(r"""
        name: t
        stages:
          - {name: words, prompt: '{input}', parse: [{split: ' '}, {join: ','}]}
          - {name: count, prompt: 'n={stages.words.output}', parse: {regex: 'n=(\w+)'}}
    """)
    before = runtime.engine.stats["requests"]
    res = StackRunner(runtime).run(spec, "alpha beta gamma")
    assert res.error is None and res.output == "alpha"
    assert runtime.engine.stats["requests"] == before  # no model call
    assert [t.kind for t in res.trace] == ["transform", "transform"]
    assert res.trace[0].output == "alpha,beta,gamma"


def test_model_stages_match_direct_generation_and_are_traced(runtime):
    spec = spec_of(SMALLEST)
    record = '{"name": "Ana", "born": "1999-04-09"}'
    res = StackRunner(runtime).run(spec, record)
    assert res.error is None
    extract_prompt = f'What is the value of "born" in {record}?'
    s = Sampling(max_tokens=64)
    want1 = runtime.generate(extract_prompt, "json_field", s).text
    want2 = runtime.generate(f"Rewrite the date {want1} in words", "date_format", s).text
    assert res.trace[0].input == extract_prompt and res.trace[0].route == "json_field" and res.trace[0].output == want1
    assert res.trace[1].input == f"Rewrite the date {want1} in words" and res.trace[1].route == "date_format"
    assert res.output == want2
    assert all(t.ms > 0 and t.completion_tokens > 0 for t in res.trace)


def test_map_stage_runs_once_per_item_and_joins(runtime):
    spec = spec_of("""
        name: m
        stages:
          - {name: items, prompt: '{input}', parse: {split: ';'}}
          - {name: each, map: '{stages.items.output}', prompt: 'Reverse the order of these words: {item}', model: reverse_words,
             max_tokens: 6, join: ' / '}
    """)
    res = StackRunner(runtime).run(spec, "a b; c d; e f")
    assert res.error is None
    each = res.trace[1]
    assert each.input == [f"Reverse the order of these words: {x}" for x in ("a b", "c d", "e f")]
    s = Sampling(max_tokens=6)
    want = [runtime.generate(p, "reverse_words", s).text for p in each.input]
    assert res.output == " / ".join(want)


def test_auto_stages_record_the_routers_decision(runtime):
    spec = spec_of("name: a\nstages:\n  - {name: s, prompt: '{input}', model: auto, max_tokens: 4}")
    res = StackRunner(runtime).run(spec, "Reverse the order of these words: one two")
    t = res.trace[0]
    assert t.scores is not None and t.abstained is not None
    assert t.route == str(runtime.decide("auto", [t.input])[0].route)


def test_independent_stages_decode_together_and_stage_two_of_one_beside_stage_one_of_another(runtime, monkeypatch):
    """Within one execution the two branches of a wave decode in the same steps; across
    executions, stage 2 of A decodes in the same batch as stage 1 of B (started later)."""
    import threading

    engine = runtime.engine
    # Every stage runs to its max_tokens: a stage that a random tiny model ends at EOS after
    # a token or two would leave no overlap to observe (the test failed ~1 run in 5 so).
    monkeypatch.setattr(type(runtime.base), "eos_token_id", property(lambda self: -1))
    seen: list[set[str]] = []
    real = engine.runner.decode

    def spy(cache, tokens, lora):
        seen.append({str(r.route) for r in engine.running})
        return real(cache, tokens, lora)

    engine.runner.decode = spy
    runner = StackRunner(runtime)
    branches = spec_of("""
        name: branches
        stages:
          - {name: left, prompt: '{input} x', model: json_field, max_tokens: 12}
          - {name: right, prompt: '{input} y', model: date_format, max_tokens: 12}
          - {name: both, prompt: '{stages.left.output} {stages.right.output}'}
    """)
    a = spec_of("""
        name: a
        stages:
          - {name: one, prompt: 'Reverse the order of these words: {input}', model: reverse_words, max_tokens: 2}
          - {name: two, prompt: '{stages.one.output} and more', model: json_field, max_tokens: 160}
    """)
    b = spec_of("name: b\nstages:\n  - {name: one, prompt: '{input} please', model: date_format, max_tokens: 24}")
    engine.start()
    try:
        res = runner.run(branches, "hello")
        assert res.error is None
        assert any({"json_field", "date_format"} <= s for s in seen)
        seen.clear()
        out: dict[str, object] = {}
        ta = threading.Thread(target=lambda: out.__setitem__("a", runner.run(a, "a b c")))
        ta.start()
        while not any("json_field" in s for s in seen):  # A has reached its second stage
            assert ta.is_alive(), "A finished before its second stage was seen decoding"
            threading.Event().wait(0.001)
        out["b"] = runner.run(b, "2001-02-03")
        ta.join()
    finally:
        engine.runner.decode = real
        engine.stop()
    assert out["a"].error is None and out["b"].error is None
    assert len(out["a"].trace[1].raw) and out["a"].trace[1].completion_tokens > 1
    assert any({"json_field", "date_format"} <= s for s in seen), "stage 2 of A never shared a step with stage 1 of B"


def test_one_is_stack_test_for_refs_specs_and_routes():
    from lorastack.route import SpecError, is_stack, parse_spec

    assert is_stack("stack/date") and is_stack(parse_spec("stack/date")) and is_stack(spec_of(SMALLEST))
    assert not any(is_stack(s) for s in ("base", "auto", "a:0.5+b:0.5", parse_spec("sort_words")))
    with pytest.raises(SpecError):
        is_stack("stack/../x")


def test_unknown_adapter_in_a_stage_is_a_one_line_error(runtime):
    spec = spec_of("name: u\nstages:\n  - {name: s, prompt: '{input}', model: nope}")
    with pytest.raises(StackError, match="stage 's': unknown adapter 'nope'"):
        StackRunner(runtime).run(spec, "x")


def test_a_failing_stage_fails_its_execution_only(runtime, monkeypatch):
    spec = spec_of(SMALLEST)
    engine = runtime.engine
    real = engine.bank.slots_for

    def broken(route):
        if route == parse_spec("date_format"):
            raise RuntimeError("injected")
        return real(route)

    monkeypatch.setattr(engine.bank, "slots_for", broken)
    res = StackRunner(runtime).run(spec, '{"born": "2000-01-01"}')
    assert res.error is not None and "stage 'words'" in res.error and "injected" in res.error
    assert res.trace[0].output  # the first stage's work is still in the trace


# ------------------------------------------------------------------ store, spec grammar, CLI
def test_store_add_get_list_remove_and_spec_grammar(runtime, tmp_path):
    store = StackStore(runtime.library.root)
    spec = spec_of(SMALLEST)
    store.add(spec)
    assert store.names() == ["date-from-record"] and store.get("date-from-record").stages == spec.stages
    with pytest.raises(Exception, match="already exists"):
        store.add(spec)
    assert parse_spec("stack/date-from-record") == StackRef("date-from-record")
    with pytest.raises(Exception, match="name"):
        parse_spec("stack/../x")
    store.remove("date-from-record")
    assert store.names() == []


def test_cli_stack_add_run_trace_list_show_rm_and_generate(tiny_base_dir, tmp_path):
    from lorastack.base import Base

    base = Base.load(str(tiny_base_dir))
    lib = Library(tmp_path / "lib")
    for i, name in enumerate(("json_field", "date_format")):
        lib.add(make_peft_adapter(base, tmp_path / "src" / name, seed=i), name, base=base)
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(SMALLEST)
    common = [sys.executable, "-m", "lorastack.cli", "--base", str(tiny_base_dir), "--library", str(tmp_path / "lib")]

    def run(*args):
        return subprocess.run([*common, *args], capture_output=True, text=True, timeout=300)

    r = run("stack", "run", str(spec_file), '{"born": "2000-01-01"}', "--trace")
    assert r.returncode == 0, r.stderr
    assert "--- extract (model) [json_field]" in r.stderr and "--- words (model) [date_format]" in r.stderr
    r = run("stack", "add", str(spec_file))
    assert r.returncode == 0 and "added stack/date-from-record" in r.stdout, r.stderr
    r = run("stack", "list", "--json")
    assert json.loads(r.stdout)[0]["name"] == "stack/date-from-record"
    assert "name: date-from-record" in run("stack", "show", "stack/date-from-record").stdout
    r = run("stack", "run", "stack/date-from-record", '{"born": "2000-01-01"}', "--json")
    out = json.loads(r.stdout)
    assert [t["stage"] for t in out["trace"]] == ["extract", "words"]
    r2 = run("generate", '{"born": "2000-01-01"}', "--model", "stack/date-from-record")
    assert r2.returncode == 0 and r2.stdout.strip() == out["output"].strip()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nstages:\n  - {name: s, prompt: '{input}', model: nope}\n")
    r = run("stack", "add", str(bad))
    assert r.returncode == 2 and "unknown adapter 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = run("adapters", "rm", "date_format")  # a stack uses it: removed, with a note naming the stack
    assert r.returncode == 0 and "note: stacks date-from-record use date_format" in r.stderr, r.stderr
    assert run("stack", "rm", "date-from-record").returncode == 0
    r = run("generate", "x", "--model", "stack/date-from-record")
    assert r.returncode == 2 and "unknown stack" in r.stderr


# ------------------------------------------------------------------ server
def test_stack_in_the_server_with_the_openai_client_and_concurrent_requests(runtime):
    from openai import OpenAI

    from lorastack.serve import ServeSettings, create_app
    from lorastack.serve.background import running

    StackStore(runtime.library.root).add(spec_of(SMALLEST))
    want = StackRunner(runtime).run(spec_of(SMALLEST), '{"born": "2000-01-01"}').output
    app = create_app(runtime, ServeSettings())
    with running(app) as url:
        client = OpenAI(base_url=url + "/v1", api_key="x")
        assert "stack/date-from-record" in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model="stack/date-from-record", temperature=0,
                                               messages=[{"role": "user", "content": '{"born": "2000-01-01"}'}])
        assert reply.choices[0].message.content == want
        trace = reply.to_dict()["lorastack"]["trace"]
        assert [t["stage"] for t in trace] == ["extract", "words"] and trace[1]["route"] == "date_format"
        chunks = list(client.chat.completions.create(model="stack/date-from-record", stream=True,
                                                     messages=[{"role": "user", "content": '{"born": "2000-01-01"}'}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].to_dict()["lorastack"]["trace"][0]["stage"] == "extract"
        from concurrent.futures import ThreadPoolExecutor

        stats0 = dict(runtime.engine.stats)
        with ThreadPoolExecutor(50) as pool:  # 50 concurrent stack requests
            outs = list(pool.map(lambda i: client.chat.completions.create(
                model="stack/date-from-record", messages=[{"role": "user", "content": '{"born": "2000-01-01"}'}]), range(50)))
        assert all(o.choices[0].message.content == want for o in outs)
        steps = runtime.engine.stats["steps"] - stats0["steps"]
        rows = runtime.engine.stats["batch_rows_sum"] - stats0["batch_rows_sum"]
        print(f"\n50 concurrent stack requests: {steps} decode steps, mean batch size {rows / steps:.1f} rows")
        assert rows / steps > 4  # stages of different requests decoded side by side, not one at a time
        import httpx

        r = httpx.post(url + "/v1/chat/completions", json={"model": "stack/nope", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and "unknown stack" in r.json()["error"]["message"]


# ------------------------------------------------------------------ composite tasks and training
def test_composite_tasks_carry_intermediate_targets_and_a_longer_split():
    from lorastack.stacks.composite import COMPOSITE
    from lorastack.tasks.task import split_of

    assert len(COMPOSITE) >= 4
    for task in COMPOSITE.values():
        train, test, long = (task.generate(30, s, seed=0) for s in ("train", "test", "long"))
        assert all(set(task.stage_order) <= set(r["stages"]) for r in train + test + long)
        assert all(r["stages"][task.stage_order[-1]] == r["completion"] for r in train)
        assert all(split_of(r["prompt"]) == "train" for r in train) and all(split_of(r["prompt"]) == "test" for r in test + long)
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test + long}
        size = (lambda r: len(r["completion"])) if task.name == "word_problem" else (lambda r: len(r["prompt"]))
        assert max(size(r) for r in train) < sum(size(r) for r in long) / len(long)  # bigger than anything trained on
        lib, trained = parse_stack(task.library_stack()), parse_stack(task.trained_stack())
        assert [s.name for s in parse_stack(task.chain_stack()).stages] == list(task.stage_order)
        # Every trained stage learns one of the records' intermediate targets.
        assert all({s.name for s in trained.stages if s.train} <= set(r["stages"]) for r in train)
        assert all(s.model == f"{task.name.replace('_', '-')}-{s.name}" for s in trained.stages if s.train)
        # The library stack's model-free stages compute exactly what its next model stage expects.
        for r in test[:5]:
            outs: dict[str, str] = {}
            for s in lib.stages:
                if s.kind != "transform":
                    break
                outs[s.name] = s.finish(s.prompt.render(r["prompt"], outs))
            nxt = next(s for s in lib.stages if s.kind != "transform")
            rendered = nxt.prompt.render(r["prompt"], {**outs, **{k: v for k, v in r["stages"].items()}})
            assert "{" not in rendered.replace('{"', "") or nxt.name == "extract"
            if task.name == "word_problem":
                assert outs["expr"] == r["stages"]["expr"]


def test_stage_records_are_teacher_forced_and_missing_targets_are_named():
    from lorastack.data import DataError
    from lorastack.stacks.composite import get_composite
    from lorastack.stacks.train import stage_records

    task = get_composite("sort_desc")
    spec = parse_stack(task.chain_stack())
    recs = task.generate(4, "train", seed=1)
    per = stage_records(spec, recs)
    assert [x["prompt"] for x in per["sort"]] == [r["prompt"] for r in recs]
    assert [x["prompt"] for x in per["reverse"]] == [r["stages"]["sort"] for r in recs]  # the reference, not a model output
    assert [x["completion"] for x in per["reverse"]] == [r["completion"] for r in recs]
    broken = [dict(recs[0], stages={"reverse": "x"})]
    with pytest.raises(DataError, match="record 1: 'stages' has no reference output for stage 'sort'"):
        stage_records(spec, broken)
    with pytest.raises(StackError, match="no stage is marked"):
        stage_records(spec_of(SMALLEST), recs)


def _train_composite_stack(runtime, name: str, prefix: str):
    """A composite task's trained stack, two steps per adapter on the tiny model: (task, spec, adapters)."""
    from lorastack.stacks.composite import get_composite
    from lorastack.stacks.train import train_stack
    from lorastack.train import TrainConfig

    task = get_composite(name)
    spec = parse_stack(task.trained_stack(prefix=prefix))
    adapters = train_stack(runtime.base, runtime.library, spec, task.generate(16, "train", seed=0),
                           TrainConfig(rank=2, alpha=4, steps=2, batch_size=4, eval_generate=0), progress=False)
    return task, spec, adapters


def test_stack_train_makes_one_adapter_per_stage_and_the_stack_runs(runtime):
    task, spec, adapters = _train_composite_stack(runtime, "caesar_title", "ct")
    assert [a.name for a in adapters] == ["ct-letter", "ct-title"]
    assert adapters[1].card.data["stage"] == "title"
    record = task.generate(1, "long", seed=0)[0]
    res = StackRunner(runtime).run(spec, record["prompt"])
    assert res.error is None and [t.stage for t in res.trace] == ["coded", "spelled", "letter", "decode", "title"]
    plain = record["stages"]["decode"]
    assert res.trace[2].route == ["ct-letter"] * len(plain)  # the map decodes letter by letter ("_" for a space)
    assert res.trace[2].input[0] == f"Decode this Caesar cipher letter (shift 1; _ stays _): {record['prompt'].split(': ')[1][0]}"
    assert res.trace[4].route == "ct-title"


def test_sort_desc_stack_trains_two_adapters_and_maps_its_bucket_stage_over_the_letters_it_wrote(runtime):
    task, spec, adapters = _train_composite_stack(runtime, "sort_desc", "sd")
    assert [a.name for a in adapters] == ["sd-letters", "sd-bucket"]
    record = task.generate(1, "long", seed=0)[0]
    words = record["prompt"].split(": ")[1].split()
    res = StackRunner(runtime).run(spec, record["prompt"])
    trace = {t.stage: t for t in res.trace}
    assert res.error is None and sorted(trace) == sorted(["words", "initials", "tagged", "letters", "bucket", "desc"])
    assert trace["initials"].output == " ".join(w[0] for w in words)  # extraction only, input order kept
    assert trace["tagged"].output == ", ".join(f"{w[0]}: {w}" for w in words)
    letters = trace["letters"].output.split()  # the (tiny, untrained) model's letters drive the map
    assert trace["bucket"].route == ["sd-bucket"] * len(letters)
    assert trace["bucket"].input == [f"{trace['tagged'].output}. Write the words marked {c}, last in the alphabet first."
                                     for c in letters]
    lines = [line.strip() for raw in trace["bucket"].raw or [] for line in raw.strip().split("\n") if line.strip()]
    assert trace["desc"].output == " ".join(lines)  # the buckets' answers, joined in order


def test_stages_naming_one_adapter_train_it_once_on_all_their_records(runtime):
    """One step repeated (here: upper-casing a word, twice) is one adapter, trained once on
    both stages' records for `steps` steps, not twice with the second overwriting the first."""
    from lorastack.stacks.train import stage_records, train_stack
    from lorastack.train import TrainConfig

    spec = spec_of("""
        name: twice
        stages:
          - {name: a, prompt: 'Upper-case: {input}', model: up, train: true}
          - {name: b, prompt: 'Upper-case: {stages.a.output} too', model: up, train: true}
    """)
    recs = [{"prompt": w, "completion": f"{w.upper()} TOO", "stages": {"a": w.upper()}} for w in ("ab", "cd", "ef")]
    assert stage_records(spec, recs)["b"][0] == {"prompt": "Upper-case: AB too", "completion": "AB TOO"}
    adapters = train_stack(runtime.base, runtime.library, spec, recs,
                           TrainConfig(rank=2, alpha=4, steps=2, batch_size=4, eval_generate=0), progress=False)
    assert [a.name for a in adapters] == ["up"]
    assert adapters[0].card.data["stage"] == ["a", "b"] and adapters[0].card.data["records"] == 6


def test_designed_stage_records_compute_transforms_and_split_map_targets_per_item():
    from lorastack.stacks.composite import get_composite
    from lorastack.stacks.train import stage_records

    task = get_composite("caesar_title")
    recs = task.generate(6, "train", seed=2)
    per = stage_records(parse_stack(task.trained_stack()), recs)
    # One record per letter: the coded letter in, the plain letter out; a space passes as "_".
    pairs = [(c.replace(" ", "_"), p.replace(" ", "_")) for r in recs
             for c, p in zip(r["prompt"].split(": ")[1], r["stages"]["decode"])]
    assert [(x["prompt"], x["completion"]) for x in per["letter"]] == \
        [(f"Decode this Caesar cipher letter (shift 1; _ stays _): {c}", p) for c, p in pairs]
    assert {p for c, p in pairs if c != "_"} and all(p != c for c, p in pairs if c != "_")  # the model must shift
    # The title stage reads the join transform's output over the reference letters: the decoded phrase.
    assert [x["prompt"] for x in per["title"]] == [f"Convert to title case: {r['stages']['decode']}" for r in recs]
    sort = get_composite("sort_desc")
    recs = sort.generate(16, "train", seed=1)
    spec = parse_stack(sort.trained_stack())
    per = stage_records(spec, recs)
    assert list(per) == ["letters", "bucket"]
    # The letters stage reads the words' first letters (a transform: extraction, in input
    # order, repeats kept) beside the alphabet from z to a, and must write the ones present, in that order.
    words = [r["prompt"].split(": ")[1].split() for r in recs]
    za = " ".join("zyxwvutsrqponmlkjihgfedcba")
    assert [x["prompt"] for x in per["letters"]] == \
        [f"Go through {za} and write each letter that is in '{' '.join(w[0] for w in ws)}'" for ws in words]
    assert [x["completion"] for x in per["letters"]] == [" ".join(sorted({w[0] for w in ws}, reverse=True)) for ws in words]
    # One bucket record per letter: the list with each word tagged by its first letter in,
    # the words with that letter out, last in the alphabet first.
    assert len(per["bucket"]) == sum(len({w[0] for w in ws}) for ws in words)
    first, top = per["bucket"][0], max(words[0])
    tagged = ", ".join(f"{w[0]}: {w}" for w in words[0])
    assert first["prompt"] == f"{tagged}. Write the words marked {top[0]}, last in the alphabet first."
    assert first["completion"] == " ".join(sorted((w for w in words[0] if w[0] == top[0]), reverse=True))
    assert any(" " in x["completion"] for x in per["bucket"])  # some buckets hold two words: a small sort
    # The model-free last stage only joins the buckets' lines: the reference buckets give the answer.
    desc = spec.stage("desc")
    assert all(desc.finish(desc.prompt.render(r["prompt"], {"bucket": r["stages"]["bucket"]})) == r["completion"] for r in recs)


def test_hostile_specs_alias_bombs_and_backtracking_regexes_are_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x]\nb: &b [*a, *a]\nname: s\nstages:\n  - {name: t, prompt: '{input}'}\n")
    with pytest.raises(StackError, match="aliases"):
        load_stack(bomb)
    with pytest.raises(StackError, match="nests quantifiers"):
        spec_of("name: s\nstages:\n  - {name: t, prompt: '{input}', parse: {regex: '(a+)+b'}}")


def test_stage_limits_prompt_length_output_size_and_bad_inputs(runtime):
    """Third hostile pass: a stage is no way around the prompt cap, transforms cannot grow
    without bound, and odd inputs are errors of that execution, not crashes."""
    long = spec_of("name: l\nstages:\n  - {name: s, prompt: '{input}', model: base, max_tokens: 1}")
    res = StackRunner(runtime).run(long, "w " * 5000)
    assert res.error is not None and "tokens; a stage takes at most 4096" in res.error
    bomb = {"name": "b", "stages": [{"name": "s0", "prompt": "{input}"}] + [
        {"name": f"s{i}", "prompt": "".join(f"{{stages.s{i - 1}.output}}" for _ in range(4))} for i in range(1, 9)]}
    res = StackRunner(runtime).run(parse_stack(bomb), "x" * 1000)
    assert res.error is not None and "characters; a stage's is at most" in res.error
    with pytest.raises(StackError, match="split must not be empty"):
        spec_of("name: e\nstages:\n  - {name: m, map: '{input}', split: '', prompt: '{item}', model: base}")
    with pytest.raises(StackError, match="backtrack|nests quantifiers"):
        spec_of("name: r\nstages:\n  - {name: t, prompt: '{input}', parse: {regex: '(a|a)*c'}}")
    deep = spec_of("name: d\nstages:\n  - {name: t, prompt: '{input}', parse: {json_field: a}}")
    res = StackRunner(runtime).run(deep, "[" * 5000 + "]" * 5000)
    assert res.error is None and res.output == ""
