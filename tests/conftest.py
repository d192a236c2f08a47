"""Shared fixtures: a tiny randomly initialised Llama + a small in-process BPE tokenizer.

Nothing is downloaded: the tokenizer is trained on a few hundred generated lines and the
model is built from a config, so unit tests run in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests isolate LORASTACK_HOME per test, but share the user's base cache so the embedded
# GGUF is dequantized at most once per machine (it is derived data, safe to share).
from lorastack.paths import cache_dir  # noqa: E402

os.environ.setdefault("LORASTACK_CACHE", str(cache_dir()))

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorastack.tasks import list_tasks

    corpus = []
    for task in list_tasks():
        for r in task.generate(40, "train", seed=0):
            corpus += [r["prompt"], r["completion"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture()
def tiny_base(tiny_tokenizer):
    """A fresh tiny Base per test (tests may wrap or mutate the model)."""
    from lorastack.base import Base

    return Base.from_model(make_tiny_model(len(tiny_tokenizer)), tiny_tokenizer, source="tiny")


@pytest.fixture()
def tiny_base_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    """The tiny model saved as a Hugging Face directory, for the directory-loading path."""
    model = make_tiny_model(len(tiny_tokenizer))
    out = tmp_path / "tiny-base"
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own LORASTACK_HOME so no test touches a user's library.

    Integration tests reuse one shared base cache so the GGUF is dequantized once per run.
    """
    home = tmp_path / "home"
    monkeypatch.setenv("LORASTACK_HOME", str(home))
    # The learned gate's MiniLM features cost seconds per library; tests that need them opt in.
    monkeypatch.setenv("LORASTACK_SENTENCE_ENCODER", "none")
    return home
