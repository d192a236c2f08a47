import dataclasses

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


class Interrupt(Exception):
    pass


def stop_after(k: int):
    def hook(step: int, loss: float) -> None:
        if step == k:
            raise Interrupt(f"killed after step {k}")
    return hook


def test_resume_after_interruption_gives_the_identical_adapter(tiny_base, tmp_path, isolated_home):
    """A run killed after step 7 and resumed equals an uninterrupted run, tensor for tensor."""
    from safetensors.torch import load_file

    from lorastack.library import Library
    from lorastack.train import checkpoint_for, train_to_library

    cfg = TrainConfig(rank=4, alpha=8, steps=12, batch_size=4, lr=5e-3, eval_generate=0, checkpoint_every=3, dropout=0.1)
    lib = Library(tmp_path / "lib")
    full = train_to_library(tiny_base, lib, _records(), "full", cfg, progress=False)
    ckpt = checkpoint_for(lib, "part")
    assert isolated_home / "cache" / "checkpoints" in ckpt.parents  # outside the library, in this home
    with pytest.raises(Interrupt):
        train_to_library(tiny_base, lib, _records(), "part", cfg, progress=False, on_step=stop_after(7))
    assert "part" not in lib.names() and (ckpt / "state.json").is_file()  # the library is unchanged
    import json

    assert json.loads((ckpt / "state.json").read_text())["state"]["step"] == 6  # the last checkpoint before the kill
    said, ran = [], []
    # Checkpoint spacing does not change the weights, so it may differ on resume.
    cfg = dataclasses.replace(cfg, checkpoint_every=5)
    part = train_to_library(tiny_base, lib, _records(), "part", cfg, progress=False, resume=True, log=said.append,
                            on_step=lambda step, loss: ran.append(step))
    assert any("resuming part at step 6 of 12" in m for m in said) and ran == list(range(7, 13))  # only the rest ran
    wa, wb = load_file(full.path / "adapter_model.safetensors"), load_file(part.path / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full.card.training["loss_curve"] == part.card.training["loss_curve"]
    # A finished run leaves no checkpoint behind (and none was left for the uninterrupted one).
    assert not ckpt.exists() and not checkpoint_for(lib, "full").exists()
    assert (part.path / "loss.png").stat().st_size > 1000


def test_resume_refuses_a_checkpoint_of_another_run_or_none(tiny_base, tmp_path):
    from lorastack.library import Library
    from lorastack.train import train_to_library

    cfg = TrainConfig(rank=4, alpha=8, steps=6, batch_size=4, eval_generate=0, checkpoint_every=2)
    lib = Library(tmp_path / "lib")
    with pytest.raises(LorastackError, match="no checkpoint to resume"):
        train_to_library(tiny_base, lib, _records(), "x", cfg, progress=False, resume=True)
    with pytest.raises(Interrupt):
        train_to_library(tiny_base, lib, _records(), "x", cfg, progress=False, on_step=stop_after(3))
    with pytest.raises(LorastackError, match="other data, settings or base"):
        train_to_library(tiny_base, lib, _records(), "x", TrainConfig(rank=4, alpha=8, steps=6, batch_size=4, eval_generate=0,
                         checkpoint_every=2, lr=1e-2), progress=False, resume=True)


def test_holdout_is_announced_and_eval_n_sets_it(tiny_base, tmp_path):
    said = []
    cfg = TrainConfig(rank=2, alpha=4, steps=2, batch_size=4, eval_generate=0)
    r = train_adapter(tiny_base, _records(40), "a", cfg, tmp_path / "a", progress=False, log=said.append)
    assert said[0] == "held out 10% (n=4) of 40 records for eval; --eval-n to change"
    assert r.card["data"]["n_eval"] == 4
    said.clear()
    r = train_adapter(tiny_base, _records(40), "b", TrainConfig(rank=2, alpha=4, steps=2, batch_size=4, eval_generate=0, eval_n=10),
                      tmp_path / "b", progress=False, log=said.append)
    assert "(n=10)" in said[0] and r.card["data"] == {"n_train": 30, "n_eval": 10}
    r = train_adapter(tiny_base, _records(40), "c", TrainConfig(rank=2, alpha=4, steps=2, batch_size=4, eval_n=0),
                      tmp_path / "c", progress=False)
    assert r.card["data"]["n_eval"] == 0 and "eval_loss" not in r.card["metrics"]
    with pytest.raises(LorastackError, match="leaves nothing to train on"):
        train_adapter(tiny_base, _records(10), "d", TrainConfig(eval_n=10), tmp_path / "d", progress=False)


def test_early_stop_keeps_the_best_held_out_weights(tiny_base, tmp_path):
    """With a learning rate that makes held-out loss climb, training stops after PATIENCE bad
    evaluations and the adapter is the one of the best evaluation."""
    said = []
    cfg = TrainConfig(rank=4, alpha=8, steps=60, batch_size=4, lr=0.3, warmup=1, eval_generate=0, early_stop=2, eval_every=3,
                      autocast_bf16=False, eval_n=8)
    r = train_adapter(tiny_base, _records(48), "e", cfg, tmp_path / "e", progress=False, log=said.append)
    tr = r.card["training"]
    assert tr["stopped_early"] and tr["steps_run"] < 60, tr
    curve = tr["eval_curve"]
    best_step, best = min(curve, key=lambda sv: sv[1])
    assert tr["best_step"] == best_step and curve[-1][0] == tr["steps_run"] and len([s for s, _ in curve if s > best_step]) == 2
    assert any(m.startswith("early stop at step") for m in said)
    # The saved adapter's held-out loss is the best one's, not the last evaluation's.
    assert r.card["metrics"]["eval_loss"] == pytest.approx(best, abs=1e-3)
