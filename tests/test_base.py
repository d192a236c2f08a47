import torch

from lorastack.base import Base, model_fingerprint
from tests.conftest import make_tiny_model


def test_fingerprint_is_stable_and_dtype_independent(tiny_tokenizer):
    m = make_tiny_model(len(tiny_tokenizer), seed=0)
    fp32 = model_fingerprint(m)
    assert fp32 == model_fingerprint(make_tiny_model(len(tiny_tokenizer), seed=0))
    assert fp32 == model_fingerprint(m.to(torch.bfloat16))
    assert fp32 != model_fingerprint(make_tiny_model(len(tiny_tokenizer), seed=1))


def test_load_hf_directory_in_both_dtypes(tiny_base_dir):
    a = Base.load(str(tiny_base_dir), dtype="float32")
    b = Base.load(str(tiny_base_dir), dtype="bfloat16")
    assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
    assert a.fingerprint == b.fingerprint
    assert all(not p.requires_grad for p in a.model.parameters())
    info = a.info()
    assert info["num_hidden_layers"] == 2 and "q_proj" in info["target_modules"]


def test_bad_sources_give_clear_errors(tmp_path):
    import pytest

    from lorastack.base import BaseLoadError

    with pytest.raises(BaseLoadError, match="not found"):
        Base.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseLoadError, match="neither a .gguf file nor a directory with config.json"):
        Base.load(str(tmp_path / "empty"))
    with pytest.raises(Exception, match="unknown dtype"):
        Base.load(str(tmp_path / "missing"), dtype="int3")


def test_render_uses_empty_system_turn_and_keeps_given_system(tiny_base):
    text = tiny_base.render([{"role": "user", "content": "hello"}])
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    text = tiny_base.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert tiny_base.completion_ids("x")[-1] == tiny_base.eos_token_id
