"""The hostile-user table of issue #15, replayed: every case gets a clear 4xx (or one-line
CLI error), nothing invalid reaches the library, and the server keeps serving after each."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorastack.errors import LorastackError
from lorastack.library import Library
from test_library import make_peft_adapter
from test_serve import chat_body, client, live_server, runtime  # noqa: F401 - fixtures

REVERSE = "Reverse the order of these words: red green blue"


def assert_still_serving(c) -> None:
    r = c.post("/v1/chat/completions", json=chat_body("reverse_words"))
    assert r.status_code == 200, r.text
    assert c.get("/health").status_code == 200


# ------------------------------------------------------------------ sampling parameters
@pytest.mark.parametrize("extra", [{"temperature": 1e-300}, {"temperature": 0.8, "top_p": 1e-300},
                                   {"temperature": 5e-324, "top_p": 5e-324}])
def test_degenerate_temperature_or_top_p_is_greedy_and_the_engine_lives(runtime, extra):
    with client(runtime) as c:
        greedy = c.post("/v1/chat/completions", json=chat_body("reverse_words")).json()["choices"][0]["message"]["content"]
        r = c.post("/v1/chat/completions", json={**chat_body("reverse_words"), **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == greedy
        assert_still_serving(c)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seed_beyond_64_bits_is_a_4xx_naming_seed(runtime, seed):
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json={**chat_body("reverse_words"), "seed": seed, "temperature": 0.7})
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == "seed", r.text
        r = c.post("/v1/chat/completions", json={**chat_body("reverse_words"), "seed": 2**64 - 1, "temperature": 0.7})
        assert r.status_code == 200, r.text
        assert_still_serving(c)


def test_cli_generate_with_degenerate_temperature_prints_no_traceback(tiny_base_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lorastack.cli", "--base", str(tiny_base_dir), "--library", str(tmp_path / "lib"),
                        "generate", "hello", "--temperature", "1e-300", "--max-tokens", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


def test_adapter_with_nan_weights_behind_the_librarys_back_fails_its_requests_only(runtime, tmp_path):
    """Import refuses NaN weights (below); one written into the library by hand must still
    not stop the engine: its requests fail with a clear 500, everyone else is served."""
    lib = runtime.library
    bad = lib.adapters_dir / "poisoned"
    shutil.copytree(lib.get("date_format").path, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, bad / "adapter_model.safetensors")
    (bad / "card.json").write_text(json.dumps({**json.loads((bad / "card.json").read_text()), "name": "poisoned"}))
    lib.reconcile()
    assert "poisoned" in lib.names()
    with client(runtime) as c:
        with ThreadPoolExecutor(6) as pool:
            bad_calls = [pool.submit(c.post, "/v1/chat/completions", json={**chat_body("poisoned"), "temperature": t})
                         for t in (0, 0.9, 0.9)]
            good_calls = [pool.submit(c.post, "/v1/chat/completions", json=chat_body("reverse_words")) for _ in range(6)]
        for f in bad_calls:
            r = f.result()
            assert r.status_code == 500 and "NaN" in r.json()["error"]["message"], r.text
        assert all(f.result().status_code == 200 for f in good_calls)
        r = c.post("/v1/chat/completions", json={**chat_body("poisoned"), "stream": True, "temperature": 0.9})
        # It fails before its first token, so the stream answers with the real status, not a 200.
        assert r.status_code == 500 and "NaN" in r.json()["error"]["message"], r.text
        assert_still_serving(c)


# ------------------------------------------------------------------ replaced while read
def _replace_during_read(monkeypatch, owner, attr, replace) -> list[int]:
    """Make the first read through `owner.attr` run `replace` and then fail the way a read
    of a directory renamed away mid-read fails (a file of it is missing)."""
    from lorastack.adapter import AdapterError

    real = getattr(owner, attr)
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            replace()
            raise AdapterError("hot: missing adapter_config.json (PEFT adapter config)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, flaky)
    return calls


@pytest.mark.parametrize("where", ["library", "pairs", "engine"])
def test_an_adapter_replaced_while_it_is_read_is_read_again_and_one_removed_is_not_found(runtime, tiny_base, tmp_path,
                                                                                       monkeypatch, where):
    """A concurrent overwrite renames a new copy in, a delete renames the old one aside: a
    read caught in between must load the new copy (or report the name unknown, which lets
    `auto` route again), never fail the request with a 'missing file' error."""
    from lorastack.adapter import Adapter, AdapterError, LoraPairs
    from lorastack.errors import NotFoundError

    lib = runtime.library
    first = make_peft_adapter(tiny_base, tmp_path / "v1", seed=1)
    second = make_peft_adapter(tiny_base, tmp_path / "v2", seed=2)
    lib.add(first, "hot", base=tiny_base)
    owner, attr = {"library": (Adapter, "open"), "pairs": (Adapter, "weights"), "engine": (LoraPairs, "load")}[where]

    def read():
        if where == "library":
            return lib.get("hot")
        return lib.pairs("hot") if where == "pairs" else runtime.generator.bank._weights("hot")

    calls = _replace_during_read(monkeypatch, owner, attr, lambda: lib.add(second, "hot", base=tiny_base, overwrite=True))
    got = read()
    assert calls[0] >= 2
    if where != "library":
        expected = LoraPairs.load(lib.get("hot"))
        name, (a, _) = next(iter(expected.modules.items()))
        assert torch.equal(got.modules[name][0].float(), a.float())  # the new copy's weights
    monkeypatch.undo()
    runtime.generator.bank.forget("hot")

    _replace_during_read(monkeypatch, owner, attr, lambda: lib.remove("hot"))
    with pytest.raises(NotFoundError):
        read()
    monkeypatch.undo()

    lib.add(first, "hot", base=tiny_base)  # a real defect, nothing changed on disk: the error stands
    _replace_during_read(monkeypatch, owner, attr, lambda: None)
    with pytest.raises(AdapterError, match="missing adapter_config"):
        read()


# ------------------------------------------------------------------ names and specs
@pytest.mark.parametrize("model", ["reverse_words\n", "auto:", "base\n", "reverse_words\t", "a:0.5\n+b:0.5"])
def test_model_specs_with_control_characters_or_empty_router_are_4xx(runtime, model):
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json=chat_body(model))
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == "model", r.text
        assert_still_serving(c)


@pytest.mark.parametrize("name", ["base\n", "nl\n", "x\ty", "ok\r", "\nlead"])
def test_adapter_names_with_control_characters_are_refused_everywhere(runtime, tiny_base, tmp_path, name):
    root = tmp_path / "imports"
    src = make_peft_adapter(tiny_base, root / "src")
    before = sorted(p.name for p in runtime.library.adapters_dir.iterdir())
    with client(runtime, import_roots=(root,)) as c:
        r = c.post("/v1/adapters", json={"path": str(src), "name": name})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
        r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(src)})
        assert r.status_code == 400, r.text
    assert sorted(p.name for p in runtime.library.adapters_dir.iterdir()) == before


def test_cli_import_refuses_a_name_with_a_newline(tiny_base_dir, tmp_path):
    from lorastack.base import Base

    src = make_peft_adapter(Base.load(str(tiny_base_dir)), tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "lorastack.cli", "--base", str(tiny_base_dir), "--library", str(tmp_path / "lib"),
                        "adapters", "import", str(src), "--name", "nl\n"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "adapter name" in r.stderr and "Traceback" not in r.stderr
    assert Library(tmp_path / "lib").names() == []


# ------------------------------------------------------------------ adapters on the way in
def corrupt(src, how: str):
    """Make one kind of bad adapter out of a good PEFT directory."""
    cfg_path, w_path = src / "adapter_config.json", src / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    w = load_file(w_path)
    key = next(k for k in w if "lora_B" in k)
    if how == "nan":
        w[key][0, 0] = float("nan")
    elif how == "inf":
        w[key][0, 0] = float("inf")
    elif how == "int":
        w[key] = w[key].to(torch.int32)
    elif how == "alpha":
        cfg["lora_alpha"] = 1e300
    elif how == "rank":
        cfg["r"] = 10**12
    elif how == "rank_mismatch":
        cfg["r"] = cfg["r"] * 2
    elif how == "targets":
        cfg["target_modules"] = ["q_proj", "frobnicate_proj"]
    elif how == "card":
        (src / "card.json").write_text(json.dumps({"name": "x", "data": "not a mapping"}))
    elif how == "deep_card":
        (src / "card.json").write_text("[" * 100_000)
    elif how == "examples":
        (src / "examples.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    cfg_path.write_text(json.dumps(cfg))
    save_file(w, w_path)
    return src


@pytest.mark.parametrize("how, needle", [
    ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("int", "floating point"), ("alpha", "lora_alpha"),
    ("rank", "'r' must be an integer"), ("rank_mismatch", "has rank"), ("targets", "frobnicate_proj"),
    ("card", "invalid card"), ("deep_card", "nested too deeply"), ("examples", "not valid UTF-8"),
])
def test_invalid_adapters_are_refused_with_a_clear_400_and_the_library_is_unchanged(runtime, tiny_base, tmp_path, how, needle):
    root = tmp_path / "imports"
    src = corrupt(make_peft_adapter(tiny_base, root / "bad"), how)
    lib = runtime.library
    before = (lib.names(), sorted(p.name for p in lib.adapters_dir.iterdir()))
    with client(runtime, import_roots=(root,)) as c:
        r = c.post("/v1/adapters", json={"path": str(src), "name": "bad"})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert needle in msg, msg
        assert ".tmp-" not in msg and str(lib.root) not in msg  # no internal paths
        assert_still_serving(c)
    assert (lib.names(), sorted(p.name for p in lib.adapters_dir.iterdir())) == before
    # The CLI and training go through the same check (Library.add).
    with pytest.raises(LorastackError, match=re.escape(needle)):
        lib.import_dir(src, "bad", base=tiny_base)
    assert (lib.names(), sorted(p.name for p in lib.adapters_dir.iterdir())) == before


def test_symlinked_weights_outside_the_import_root_are_refused(runtime, tiny_base, tmp_path):
    root = tmp_path / "imports"
    outside = make_peft_adapter(tiny_base, tmp_path / "secret", seed=3)
    src = make_peft_adapter(tiny_base, root / "innocent")
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with client(runtime, import_roots=(root,)) as c:
        r = c.post("/v1/adapters", json={"path": str(src), "name": "innocent"})
        assert r.status_code == 403 and "outside the server's import roots" in r.json()["error"]["message"], r.text
        assert str(outside) not in r.json()["error"]["message"]
        assert "innocent" not in runtime.library.names()
        # A link that stays inside the root is fine.
        inside = make_peft_adapter(tiny_base, root / "real", seed=4)
        (src / "adapter_model.safetensors").unlink()
        (src / "adapter_model.safetensors").symlink_to(inside / "adapter_model.safetensors")
        assert c.post("/v1/adapters", json={"path": str(src), "name": "innocent"}).status_code == 201


def test_fifo_in_an_import_dir_is_refused_without_blocking(runtime, tiny_base, tmp_path):
    import os

    root = tmp_path / "imports"
    src = make_peft_adapter(tiny_base, root / "fifo")
    (src / "adapter_config.json").unlink()
    os.mkfifo(src / "adapter_config.json")
    with client(runtime, import_roots=(root,)) as c:
        r = c.post("/v1/adapters", json={"path": str(src), "name": "fifo"})
        assert r.status_code == 400 and "not a regular file" in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------ training data
@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', ":2: not valid UTF-8"),
    (b'{"prompt": "a", "completion": "b"}\n' + b"[" * 100_000 + b"\n", ":2: invalid JSON (nested too deeply)"),
    (b'{"prompt": "a", "completion": ' + b"9" * 5000 + b"}\n", ":1: invalid JSON"),
])
def test_bad_training_files_give_file_line_errors(tmp_path, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "lorastack.cli", "train", str(bad), "--name", "x"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert f"{bad}{needle}" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ docs and metrics
def test_docs_and_schema_are_behind_the_api_key(runtime):
    with client(runtime, api_key="sekrit") as c:
        for path in ("/docs", "/openapi.json"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/redoc").status_code in (401, 404)
        assert c.get("/health").status_code == 200  # liveness stays open for supervisors
    with client(runtime, docs=False) as c:
        assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 404
    with client(runtime) as c:
        assert c.get("/docs").status_code == 200 and "paths" in c.get("/openapi.json").json()


def test_disconnected_streams_are_counted_apart_from_completed_ones(runtime):
    runtime.base.model.config.max_position_embeddings = 4096
    with live_server(runtime) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions", json=chat_body("base", max_tokens=1000, ignore_eos=True, stream=True)) as r:
                next(r.iter_lines())
            r = h.post("/v1/chat/completions", json=chat_body("base", stream=True))
            assert "[DONE]" in r.text
            deadline = threading.Event()
            for _ in range(200):
                metrics = h.get("/metrics").text
                if 'endpoint="/v1/chat/completions",status="499"' in metrics:
                    break
                deadline.wait(0.05)
    assert 'lorastack_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0' in metrics
    assert 'lorastack_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics


def test_dead_engine_loop_makes_health_503_and_the_next_request_restarts_it(runtime, monkeypatch):
    engine = runtime.engine
    with client(runtime) as c:
        assert c.get("/health").status_code == 200
        real = engine.step
        monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(SystemExit("injected")))
        r = c.post("/v1/chat/completions", json=chat_body("reverse_words"))
        assert r.status_code == 500 and "engine stopped" in r.json()["error"]["message"], r.text
        for _ in range(500):  # the loop thread ends right after failing the request
            if not engine.alive:
                break
            time.sleep(0.02)
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "engine stopped" and "injected" in h.json()["error"]
        monkeypatch.setattr(engine, "step", real)
        assert_still_serving(c)  # the request restarted the loop
        assert c.get("/health").json()["restarts"] == 1


# ------------------------------------------------------------------ routing determinism
def test_the_same_input_gets_the_same_route_alone_in_batches_and_under_load(runtime):
    from lorastack.tasks import get_task

    prompt = get_task("reverse_words").generate(1, "test", seed=11)[0]["prompt"]
    others = [r["prompt"] for t in ("date_format", "add_numbers", "reverse_words") for r in get_task(t).generate(3, "test", seed=5)]
    alone = runtime.decide("auto", [prompt])[0]
    for size in (2, 4, 8):
        batch = others[: size - 1]
        got = runtime.decide("auto", batch[: size // 2] + [prompt] + batch[size // 2 :])[size // 2]
        assert (str(got.route), got.scores, got.abstained) == (str(alone.route), alone.scores, alone.abstained)
    with client(runtime) as c:  # many concurrent requests, decoding while they are routed
        with ThreadPoolExecutor(12) as pool:
            bodies = [chat_body("auto", content=p, max_tokens=16) for p in [prompt] * 24 + others * 2]
            specs = [r.json()["lorastack"] for r in pool.map(lambda b: c.post("/v1/chat/completions", json=b), bodies)]
    mine = specs[:24]
    assert all(s["spec"] == str(alone.route) and s["scores"] == alone.scores for s in mine), {s["spec"] for s in mine}


def test_route_does_not_flap_while_the_same_adapter_is_replaced(runtime, tiny_base, tmp_path):
    """Overwriting an adapter swaps its directory atomically, so a reader never finds it
    missing (routing used to trim the route to the bare base in that window)."""
    from lorastack.tasks import get_task

    prompt = get_task("reverse_words").generate(1, "test", seed=11)[0]["prompt"]
    want = str(runtime.decide("auto", [prompt])[0].route)
    src = make_peft_adapter(tiny_base, tmp_path / "again", seed=0)
    examples = runtime.library.get("reverse_words").examples()
    stop = threading.Event()

    def replace_repeatedly() -> None:
        while not stop.is_set():
            runtime.library.add(src, "reverse_words", base=tiny_base, overwrite=True, examples=examples)

    t = threading.Thread(target=replace_repeatedly)
    t.start()
    try:
        seen = [runtime.library.get("reverse_words").name for _ in range(300)]
    finally:
        stop.set()
        t.join()
    assert seen == ["reverse_words"] * 300
    assert str(runtime.decide("auto", [prompt])[0].route) == want


# ------------------------------------------------------------------ no silent acceptance
@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("presence_penalty", 0.5), ("frequency_penalty", 1), ("logit_bias", {"5": 10}),
                                          ("best_of", 3)])
def test_unsupported_parameters_are_refused_by_name(runtime, field, value):
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json={**chat_body("reverse_words"), field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r = c.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("extra", [{"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"logprobs": False}, {"tools": []},
                                   {"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"user": "u1"},
                                   {"logprobs": None}])
def test_neutral_values_of_unsupported_parameters_are_accepted(runtime, extra):
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json={**chat_body("reverse_words"), **extra})
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------ second hostile pass (issue #15 retry)
@pytest.mark.parametrize("how, needle", [
    ("redos", "nests quantifiers"), ("alpha_pattern", "alpha_pattern"), ("rank_pattern_big", "rank_pattern"),
    ("rank_pattern_lie", "has rank"), ("huge_value", "magnitude"), ("fan_in", "fan_in_fan_out"),
    ("targets_int", "target_modules must be"), ("card_nan", "finite numbers"), ("card_long", "description is"),
])
def test_second_pass_adapter_bypasses_are_refused(runtime, tiny_base, tmp_path, how, needle):
    root = tmp_path / "imports"
    src = make_peft_adapter(tiny_base, root / "bad")
    cfg_path = src / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if how == "redos":
        cfg["target_modules"] = r"model\.layer(.*)*X"
    elif how == "alpha_pattern":
        cfg["alpha_pattern"] = {"q_proj": 1e300}
    elif how == "rank_pattern_big":
        cfg["rank_pattern"] = {"q_proj": 1200}
    elif how == "rank_pattern_lie":
        cfg["rank_pattern"] = {"q_proj": 8}
        cfg["r"] = 2  # tensors are rank 4: neither r nor the pattern
    elif how == "huge_value":
        w = load_file(src / "adapter_model.safetensors")
        key = next(k for k in w if "lora_B" in k)
        w[key][0, 0] = 1e38
        save_file(w, src / "adapter_model.safetensors")
    elif how == "fan_in":
        cfg["fan_in_fan_out"] = True
    elif how == "targets_int":
        cfg["target_modules"] = 123
    elif how == "card_nan":
        (src / "card.json").write_text('{"name": "bad", "metrics": {"acc": NaN}}')
    elif how == "card_long":
        (src / "card.json").write_text(json.dumps({"name": "bad", "description": "x" * 100_000}))
    cfg_path.write_text(json.dumps(cfg))
    with client(runtime, import_roots=(root,)) as c:
        t0 = time.monotonic()
        r = c.post("/v1/adapters", json={"path": str(src), "name": "bad"})
        assert time.monotonic() - t0 < 30
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert "bad" not in runtime.library.names()
        assert_still_serving(c)


def test_card_cannot_lie_about_rank_or_targets(runtime, tiny_base, tmp_path):
    root = tmp_path / "imports"
    src = make_peft_adapter(tiny_base, root / "liar", rank=4)
    (src / "card.json").write_text(json.dumps({"name": "liar", "rank": -5, "alpha": 1e9, "target_modules": ["nope"]}))
    with client(runtime, import_roots=(root,)) as c:
        r = c.post("/v1/adapters", json={"path": str(src)})
        assert r.status_code == 201, r.text
        card = r.json()["card"]
        assert (card["rank"], card["alpha"], card["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])


def test_fifo_examples_and_a_swap_after_the_check_cannot_hang_or_leak(runtime, tiny_base, tmp_path):
    """examples.jsonl as a FIFO is refused at once (no blocking open); files are read once,
    through descriptors checked as opened, so what is stored is what was checked."""
    import os

    root = tmp_path / "imports"
    src = make_peft_adapter(tiny_base, root / "fifo")
    os.mkfifo(src / "examples.jsonl")
    with client(runtime, import_roots=(root,)) as c:
        t0 = time.monotonic()
        r = c.post("/v1/adapters", json={"path": str(src), "name": "fifo"})
        assert time.monotonic() - t0 < 30
        assert r.status_code == 400 and "not a regular file" in r.json()["error"]["message"], r.text
        assert c.delete("/v1/adapters/reverse_words").status_code == 200  # admin path not stuck behind it
    with pytest.raises(LorastackError, match="not a regular file"):
        runtime.library.import_dir(src, "fifo", base=tiny_base)  # the CLI path too


def test_snapshot_reads_each_file_once_through_a_checked_descriptor(tiny_base, tmp_path):
    from lorastack.library import snapshot_files

    root = tmp_path / "imports"
    src = make_peft_adapter(tiny_base, root / "a")
    outside = make_peft_adapter(tiny_base, tmp_path / "secret", seed=5)
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(PermissionError, match="outside the server's import roots"):
        snapshot_files(src, dest, ("adapter_config.json", "adapter_model.safetensors"), (root.resolve(),))


@pytest.mark.parametrize("payload", [{"prompt": "hi \ud800"}, {"prompt": ["ok", "bad \udfff"]}])
def test_unpaired_surrogates_in_completions_are_a_400(runtime, payload):
    with client(runtime) as c:
        r = c.post("/v1/completions", content=json.dumps({"model": "base", "max_tokens": 2, **payload}),
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert_still_serving(c)


def test_unpaired_surrogate_in_training_data_is_a_file_line_error(tmp_path):
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a\\ud800", "completion": "b"}\n')
    r = subprocess.run([sys.executable, "-m", "lorastack.cli", "train", str(bad), "--name", "x"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"{bad}:2: 'prompt': not valid Unicode text" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "lorastack.cli", "train", str(tmp_path), "--name", "x"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not a regular file" in r.stderr


@pytest.mark.parametrize("model", ["\u00a0base", "\u2028base", "reverse_words:1_0", "reverse_words:inf"])
def test_specs_with_odd_whitespace_or_weights_are_refused(runtime, model):
    with client(runtime) as c:
        r = c.post("/v1/chat/completions", json=chat_body(model))
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text


def test_search_treats_percent_and_underscore_literally(runtime):
    assert runtime.library.search("%") == [] and runtime.library.search("_")[0].name in ("add_numbers", "date_format", "reverse_words")
    assert [a.name for a in runtime.library.search("e_f")] == ["date_format"]


def test_redoc_is_not_served(runtime):
    """ReDoc loads its script from a CDN (no package ships it), so only the offline /docs is served."""
    with client(runtime, api_key="k") as c:
        assert c.get("/redoc").status_code in (401, 404)
        assert c.get("/redoc", headers={"Authorization": "Bearer k"}).status_code == 404


def test_import_errors_echo_the_clients_path_not_the_servers_layout(runtime, tmp_path, monkeypatch):
    root = tmp_path / "imports"
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    with client(runtime, import_roots=(root,)) as c:
        r = c.post("/v1/adapters", json={"path": "imports/nope", "name": "x"})
        assert r.status_code in (400, 404) and str(tmp_path) not in r.json()["error"]["message"], r.text
