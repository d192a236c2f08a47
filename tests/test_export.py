"""Export: merged HF directories reproduce the engine's route, GGUF follows llama.cpp's layout,
and every export is atomic and refuses to clobber."""

from __future__ import annotations

import json

import pytest
import torch

from lorastack.engine.engine import Engine
from lorastack.engine.sampling import Sampling
from lorastack.errors import LorastackError
from lorastack.export import GGUF_FILE, export, mixture_pairs, permute_rows
from lorastack.library import Library
from lorastack.route import parse_spec
from test_library import make_peft_adapter


@pytest.fixture()
def lib(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a", rank=4, seed=1, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
            "a", base=tiny_base)
    lib.add(make_peft_adapter(tiny_base, tmp_path / "b", rank=6, seed=2, targets=("q_proj", "up_proj", "down_proj")),
            "b", base=tiny_base)
    return lib


def engine_run(tiny_base, lib, spec: str, prompt: list[int], max_tokens: int = 10) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the per-step fp32 logits the engine computed for `spec`."""
    engine = Engine(tiny_base, resolve=lib.get)
    req = engine.submit_ids(prompt, parse_spec(spec), Sampling(max_tokens=max_tokens))
    seen: list[torch.Tensor] = []
    emit = engine._emit

    def spy(rs, logits, rows):
        seen.extend(l.clone() for r, l in zip(rs, logits) if r is req)
        emit(rs, logits, rows)

    engine._emit = spy
    while not req.done:
        engine.step()
    return req.tokens, torch.stack(seen)


@pytest.mark.parametrize("spec", ["a", "a:0.7+b:0.3"])
def test_merged_export_reproduces_engine_logits_and_greedy_output(tiny_base, lib, tmp_path, spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = export(lib, spec, tmp_path / "out", mode="merged", base=tiny_base)
    assert {"config.json", "model.safetensors", "tokenizer.json", "lorastack_export.json"} <= set(res.files)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # readable by a serving account, not private
    assert all((tmp_path / "out" / f).stat().st_mode & 0o777 == 0o644 for f in res.files)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": "Reverse the order of these words: red green blue"}]
    # A plain apply_chat_template renders exactly the prompt lorastack trains and serves on.
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tiny_base.render(messages)
    prompt = tiny_base.chat_ids(messages)
    tokens, steps = engine_run(tiny_base, lib, spec, prompt)
    with torch.no_grad():
        ref = model(torch.tensor([prompt + tokens])).logits[0].float()
    expect = ref[len(prompt) - 1 : len(prompt) - 1 + len(steps)]
    assert torch.allclose(steps, expect, atol=1e-4), (steps - expect).abs().max()
    # The same greedy continuation from transformers' own generate (stops at the same eos).
    out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    eos = tiny_base.eos_token_id
    assert [t for t in out if t != eos] == [t for t in tokens if t != eos]
    # The merge really changed the weights (a no-op export would pass the checks above only for base).
    base_logits = tiny_base.model(torch.tensor([prompt])).logits[0, -1]
    assert not torch.allclose(base_logits, ref[len(prompt) - 1], atol=1e-3)


def test_peft_export_of_a_mixture_is_one_exact_cat_adapter(tiny_base, lib, tmp_path):
    export(lib, "a:0.7+b:0.3", tmp_path / "mix", mode="peft")
    imported = lib.import_dir(tmp_path / "mix", "mix", base=tiny_base)
    prompt = tiny_base.chat_ids([{"role": "user", "content": "Sort these words alphabetically: pear fig"}])
    t1, l1 = engine_run(tiny_base, lib, "a:0.7+b:0.3", prompt, 6)
    t2, l2 = engine_run(tiny_base, lib, imported.name, prompt, 6)
    assert t1 == t2 and torch.allclose(l1, l2, atol=1e-4)


@pytest.mark.parametrize("spec", ["a", "a:0.7+b:0.3"])
def test_peft_export_names_a_base_another_machine_can_load(tiny_base, lib, tmp_path, spec):
    """An adapter on the embedded base names its Hugging Face model, not the local cache it was
    trained on; other bases keep what PEFT wrote."""
    from lorastack.base import EMBEDDED_HUB_ID, EMBEDDED_NAME

    local = json.loads((lib.get("a").path / "adapter_config.json").read_text())["base_model_name_or_path"]
    export(lib, spec, tmp_path / "plain", mode="peft")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["base_model_name_or_path"] == local
    for name in ("a", "b"):  # as if trained on the embedded base
        adapter = lib.get(name)
        adapter.card.base_name = EMBEDDED_NAME
        adapter.write_card()
    export(lib, spec, tmp_path / "hub", mode="peft")
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    assert json.loads((lib.get("a").path / "adapter_config.json").read_text())["base_model_name_or_path"] == local  # library untouched


def test_export_is_atomic_refuses_clobbering_and_bad_specs(tiny_base, lib, tmp_path):
    dest = tmp_path / "d"
    export(lib, "a", dest)
    assert json.loads((dest / "lorastack_export.json").read_text())["mode"] == "peft"
    assert (dest / "adapter_model.safetensors").is_file() and (dest / "card.json").is_file()
    with pytest.raises(LorastackError, match="not empty; use --force"):
        export(lib, "b", dest)
    export(lib, "b", dest, force=True)
    assert json.loads((dest / "lorastack_export.json").read_text())["spec"] == "b"
    for spec, needle in [("auto", "routed per input"), ("base", "no adapter"), ("nope", "unknown adapter"),
                         ("stack/x", "stack"), ("../etc", "adapter name")]:
        with pytest.raises(LorastackError, match=needle):
            export(lib, spec, tmp_path / "x")
    # --force never replaces the library, anything inside it, or the directory the user is in.
    before = sorted(lib.names())
    for target in (lib.root, lib.root / "adapters" / "a", lib.root.parent):
        with pytest.raises(LorastackError, match="overlaps the library"):
            export(lib, "b", target, force=True)
    assert sorted(lib.names()) == before and (lib.get("a").path / "adapter_config.json").is_file()
    with pytest.raises(LorastackError, match="current directory"):
        export(lib, "b", "", force=True)
    # A failure mid-export leaves neither DIR nor a temporary sibling behind.
    with pytest.raises(LorastackError, match="needs the base"):
        export(lib, "a", tmp_path / "y", mode="merged")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []
    assert not (tmp_path / "y").exists()


def test_gguf_export_follows_llama_cpp_layout(tiny_base, lib, tmp_path):
    import gguf

    export(lib, "a:0.7+b:0.3", tmp_path / "g", mode="gguf", base=tiny_base)
    reader = gguf.GGUFReader(tmp_path / "g" / GGUF_FILE)
    fields = {k: f for k, f in reader.fields.items()}

    def value(key):
        f = fields[key]
        return f.parts[f.data[0]].tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else float(f.parts[f.data[0]][0])

    assert value("general.type") == "adapter" and value("adapter.type") == "lora"
    assert value("general.architecture") == "llama"
    tensors = {t.name: t for t in reader.tensors}
    rank = 10  # 4 + 6, the mixture's stacked factors
    assert value("adapter.lora.alpha") == rank
    cfg = tiny_base.model.config
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.attn_k.weight.lora_b", "blk.0.ffn_up.weight.lora_a",
            "blk.1.ffn_down.weight.lora_b"} <= set(tensors)
    # ggml order: lora_a ne = [in, r], lora_b ne = [r, out]; llama.cpp checks these against the base.
    q_a, q_b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert list(q_a.shape) == [cfg.hidden_size, rank] and list(q_b.shape) == [rank, cfg.hidden_size]
    # The update llama.cpp applies (alpha / rank = 1) is the engine's, rows in llama.cpp's Q order.
    pairs = mixture_pairs(lib, parse_spec("a:0.7+b:0.3"))
    a = torch.from_numpy(q_a.data.copy()).reshape(rank, cfg.hidden_size)
    b = torch.from_numpy(q_b.data.copy()).reshape(cfg.hidden_size, rank)
    want = permute_rows(pairs.delta("model.layers.0.self_attn.q_proj"), cfg.num_attention_heads)
    assert torch.allclose(b @ a, want, atol=1e-5)
    # k_proj rows follow the KV heads' layout; modules one parent lacks are zero-padded to the rank.
    k_b = torch.from_numpy(tensors["blk.0.attn_k.weight.lora_b"].data.copy())
    assert k_b.shape[-1] == rank


@pytest.mark.parametrize("heads,kv", [(6, 6), (6, 2)])
def test_permute_rows_is_what_transformers_undoes_when_reading_a_llama_gguf(heads, kv):
    """transformers reads llama GGUF Q/K rows back into HF order; ours must be the forward step."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    head_dim = 8
    w = torch.randn(kv * head_dim, 5)  # a k_proj-shaped matrix (q_proj when heads == kv)
    reader = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv})
    back = reader.process(permute_rows(w, kv).numpy(), "blk.0.attn_k.weight").weights
    assert torch.equal(torch.from_numpy(back), w)
    assert not torch.equal(permute_rows(w, kv), w)


@pytest.mark.integration
def test_gguf_q_rows_match_the_embedded_base_gguf(tmp_path):
    """On the real base: our Q row order applied to the HF q_proj gives the GGUF file's own attn_q."""
    import gguf
    from gguf.quants import dequantize

    from lorastack.base import Base, embedded_gguf_path

    base = Base.load("embedded", dtype="float32")
    reader = gguf.GGUFReader(embedded_gguf_path())
    t = next(t for t in reader.tensors if t.name == "blk.3.attn_q.weight")
    stored = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float().reshape(-1, base.model.config.hidden_size)
    hf = base.model.model.layers[3].self_attn.q_proj.weight.detach()
    assert torch.allclose(permute_rows(hf, base.model.config.num_attention_heads), stored, atol=1e-6)


def test_merged_export_in_bfloat16_says_so_in_its_config(tiny_base, lib, tmp_path):
    from transformers import AutoModelForCausalLM

    export(lib, "a", tmp_path / "bf", mode="merged", base=tiny_base, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf", dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LorastackError, match="unknown dtype"):
        export(lib, "a", tmp_path / "bad", mode="merged", base=tiny_base, dtype="float8")
    assert not (tmp_path / "bad").exists()


@pytest.mark.integration
def test_merged_export_of_the_embedded_base_matches_the_engine(tmp_path):
    """On the real base (dequantized from its GGUF): SmolLM2's own chat template, given only a
    user turn, renders lorastack's prompt, and the merged model scores a completion as the
    engine does for that adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorastack.base import Base
    from lorastack.engine.score import score

    base = Base.load("embedded", dtype="float32")
    lib = Library(tmp_path / "lib")
    src = make_peft_adapter(base, tmp_path / "src", rank=4, seed=3, targets=("q_proj", "k_proj", "down_proj"))
    lib.add(src, "r", base=base)
    export(lib, "r", tmp_path / "hf", mode="merged", base=base)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for msgs in ([{"role": "user", "content": "Reverse the order of these words: a b c"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]):
        assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == base.render(msgs)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = base.chat_ids([{"role": "user", "content": "Reverse the order of these words: a b c"}])
    completion = base.completion_ids("c b a")
    engine = Engine(base, resolve=lib.get)
    want = score(engine, [(prompt, completion)], [parse_spec("r")])[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    got = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).sum().item()
    base_lp = score(engine, [(prompt, completion)], [parse_spec("base")])[0]
    assert abs(got - want) < 1e-3 and abs(want - base_lp) > 0.1, (got, want, base_lp)


def test_gguf_export_in_float16_holds_the_same_update_rounded(tiny_base, lib, tmp_path):
    """`dtype="float16"` (what llama.cpp's own converter writes by default) stores F16 factors
    of the same update; the default stays F32."""
    import gguf

    export(lib, "a", tmp_path / "h", mode="gguf", base=tiny_base, dtype="float16")
    export(lib, "a", tmp_path / "f", mode="gguf", base=tiny_base)
    half = {t.name: t for t in gguf.GGUFReader(tmp_path / "h" / GGUF_FILE).tensors}
    full = {t.name: t for t in gguf.GGUFReader(tmp_path / "f" / GGUF_FILE).tensors}
    assert set(half) == set(full)
    for name, t in half.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F16
        assert full[name].tensor_type == gguf.GGMLQuantizationType.F32
        want = torch.from_numpy(full[name].data.copy())
        assert torch.equal(torch.from_numpy(t.data.copy()).float(), want.half().float())
