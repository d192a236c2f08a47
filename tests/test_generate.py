import copy

import pytest
import torch

from lorastack.engine.generate import Generator, Sampling
from lorastack.errors import LorastackError
from lorastack.route import BASE_ROUTE, Route


def _peft_dir(base, tmp_path, name, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base.model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp_path / name
    pm.save_pretrained(out)
    return out, pm


def _greedy_reference(model, base, conv, n):
    ids = torch.tensor([base.chat_ids(conv)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=base.eos_token_id, pad_token_id=base.tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if base.eos_token_id in new:
        new = new[: new.index(base.eos_token_id)]
    return base.tokenizer.decode(new, skip_special_tokens=True)


def test_batched_generation_matches_single_requests(tiny_base, tmp_path):
    path, pm = _peft_dir(tiny_base, tmp_path, "a", seed=1)
    convs = [[{"role": "user", "content": t}] for t in ["a b", "Sort these words: x y z w", "hi"]]
    ref_base = [_greedy_reference(tiny_base.model, tiny_base, c, 8) for c in convs]
    ref_a = [_greedy_reference(pm, tiny_base, c, 8) for c in convs]
    gen = Generator(tiny_base, resolve=lambda n: str(path))
    s = Sampling(max_tokens=8)
    assert [g.text for g in gen.generate(convs, Route((("a", 1.0),)), s)] == ref_a
    assert [g.text for g in gen.generate(convs, BASE_ROUTE, s)] == ref_base
    assert ref_a != ref_base  # the adapter really changes the output


def test_mixture_equals_weighted_delta_sum(tiny_base, tmp_path):
    """a:1+b:1 must equal one model carrying both deltas."""
    pa, _ = _peft_dir(tiny_base, tmp_path, "a", seed=1)
    pb, _ = _peft_dir(tiny_base, tmp_path, "b", seed=2)
    gen = Generator(tiny_base, resolve=lambda n: str({"a": pa, "b": pb}[n]))
    conv = [[{"role": "user", "content": "Reverse: one two"}]]
    mixed = gen.generate(conv, Route((("a", 1.0), ("b", 1.0))), Sampling(max_tokens=6))[0].text
    merged = _merged(len(tiny_base.tokenizer), [(pa, 1.0), (pb, 1.0)])
    assert mixed == _greedy_reference(merged, tiny_base, conv[0], 6)


def _merged(vocab, parts):
    """The tiny base (same seed as the fixture) with LoRA deltas added to its weights by hand."""
    from safetensors.torch import load_file

    from tests.conftest import make_tiny_model

    m = make_tiny_model(vocab, seed=0)
    mods = dict(m.named_modules())
    for path, w in parts:
        sd = load_file(path / "adapter_model.safetensors")
        for k, A in sd.items():
            if "lora_A" not in k:
                continue
            B = sd[k.replace("lora_A", "lora_B")]
            mod = k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
            with torch.no_grad():
                mods[mod].weight += w * 2.0 * (B @ A)  # alpha/r = 8/4
    return m.eval()


def test_sampling_validation_and_stop_strings(tiny_base):
    with pytest.raises(LorastackError, match="max_tokens"):
        Sampling(max_tokens=0)
    with pytest.raises(LorastackError, match="top_p"):
        Sampling(top_p=0)
    gen = Generator(tiny_base)
    out = gen.generate([[{"role": "user", "content": "x"}]], BASE_ROUTE, Sampling(max_tokens=5))[0]
    assert out.completion_tokens <= 5 and out.prompt_tokens > 0
    with pytest.raises(LorastackError, match="no library"):
        gen.generate([[{"role": "user", "content": "x"}]], Route((("a", 1.0),)), Sampling(max_tokens=2))


def test_seeded_sampling_is_reproducible(tiny_base):
    gen = Generator(tiny_base)
    conv = [[{"role": "user", "content": "tell me"}]]
    s = Sampling(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert gen.generate(conv, BASE_ROUTE, s)[0].text == gen.generate(conv, BASE_ROUTE, s)[0].text
