import pytest
import torch

from lorastack.errors import LorastackError
from lorastack.train import IGNORE, TrainConfig, build_example, collate, train_adapter


def test_loss_mask_covers_completion_only(tiny_base):
    rec = {"prompt": "Reverse the order of these words: a b c", "completion": "c b a"}
    ids, labels = build_example(tiny_base, rec, max_len=128)
    prompt = tiny_base.chat_ids([{"role": "user", "content": rec["prompt"]}])
    target = tiny_base.completion_ids("c b a")
    assert ids == prompt + target
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == target
    batch = collate([(ids, labels), (ids[:5], labels[:5])], pad_id=tiny_base.tokenizer.pad_token_id)
    assert batch["attention_mask"][1, 5:].sum() == 0
    assert (batch["labels"][1, 5:] == IGNORE).all()


def test_masked_loss_equals_completion_token_loss(tiny_base):
    """The HF loss with our labels equals cross-entropy over completion tokens only."""
    rec = {"prompt": "Sort these words alphabetically: pear fig", "completion": "fig pear"}
    ids, labels = build_example(tiny_base, rec, max_len=128)
    batch = collate([(ids, labels)], tiny_base.tokenizer.pad_token_id)
    with torch.no_grad():
        out = tiny_base.model(**batch)
    logits = out.logits[0, :-1]
    tgt = torch.tensor(ids[1:])
    keep = torch.tensor(labels[1:]) != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[keep], tgt[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_long_prompt_is_cut_from_the_left_and_long_completion_refused(tiny_base):
    rec = {"prompt": "word " * 200, "completion": "ok"}
    ids, labels = build_example(tiny_base, rec, max_len=32)
    assert len(ids) == 32 and labels[-len(tiny_base.completion_ids("ok")):] == tiny_base.completion_ids("ok")
    with pytest.raises(LorastackError, match="longer than --max-len"):
        build_example(tiny_base, {"prompt": "x", "completion": "word " * 100}, max_len=32)


def _records(n=48):
    from lorastack.tasks import get_task

    return get_task("reverse_words").generate(n, "train", seed=0)


def test_training_is_deterministic_and_lowers_loss(tiny_base, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(rank=4, alpha=8, steps=12, batch_size=4, lr=5e-3, eval_generate=0, autocast_bf16=False)
    a = train_adapter(tiny_base, _records(), "a", cfg, tmp_path / "a", progress=False)
    b = train_adapter(tiny_base, _records(), "b", cfg, tmp_path / "b", progress=False)
    wa = load_file(tmp_path / "a" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sum(a.losses[-3:]) / 3 < sum(a.losses[:3]) / 3
    assert a.card["data"]["n_train"] + a.card["data"]["n_eval"] == 48
    # The shared base stays unwrapped and frozen.
    assert not any("lora" in n for n, _ in tiny_base.model.named_parameters())


def test_bad_config_is_refused(tiny_base, tmp_path):
    with pytest.raises(LorastackError, match="rank must be"):
        train_adapter(tiny_base, _records(), "x", TrainConfig(rank=0), tmp_path / "x", progress=False)
    with pytest.raises(LorastackError, match="unknown target module"):
        train_adapter(tiny_base, _records(), "x", TrainConfig(targets=["nope"], steps=1), tmp_path / "x", progress=False)
