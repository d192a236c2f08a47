"""Adapters and the library: PEFT round trip, compatibility checks, atomicity, names, migrations."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from lorastack.adapter import Adapter, AdapterError
from lorastack.errors import IncompatibleError, LorastackError, NotFoundError
from lorastack.library import SCHEMA_VERSION, Library
from lorastack.names import InvalidNameError, validate_name


def make_peft_adapter(base, out: Path, rank: int = 4, seed: int = 0, targets=("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA saved by plain PEFT code, with non-zero B so it changes outputs."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base.model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a\\b", ".hidden", "x" * 65, "a..b", "base", "auto", "a b", "a:0.5", "é"])
def test_invalid_names_are_refused(bad):
    with pytest.raises(InvalidNameError):
        validate_name(bad)


@pytest.mark.parametrize("good", ["rev", "reverse_words", "v1.2-final", "A", "x" * 64])
def test_valid_names(good):
    assert validate_name(good) == good


def test_round_trip_through_peft(tiny_base, tmp_path):
    from peft import PeftModel

    src = make_peft_adapter(tiny_base, tmp_path / "src")
    lib = Library(tmp_path / "lib")
    a = lib.add(src, "qv", base=tiny_base, card_updates={"description": "test"}, examples=["hello", "world"])
    assert a.card.base_fingerprint == tiny_base.fingerprint and a.card.rank == 4
    assert sorted(a.card.target_modules) == ["q_proj", "v_proj"]
    assert lib.names() == ["qv"] and lib.get("qv").examples() == ["hello", "world"]
    # The library copy loads in PEFT and gives the same outputs as the original.
    ids = torch.tensor([[1, 5, 9, 30, 40]])
    outs = []
    for path in (src, lib.get("qv").path):
        import copy

        m = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(path))
        with torch.no_grad():
            outs.append(m(ids).logits)
    with torch.no_grad():
        plain = tiny_base.model(ids).logits
    assert torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], plain, atol=1e-3)
    # Export gives back a plain PEFT dir with the same tensors.
    out = lib.export("qv", tmp_path / "exported")
    assert torch.equal(Adapter.open(out).weights()["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       Adapter.open(src).weights()["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_pickle_weights_are_refused(tiny_base, tmp_path):
    src = make_peft_adapter(tiny_base, tmp_path / "src")
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    with pytest.raises(AdapterError, match="never loads pickle"):
        Library(tmp_path / "lib").import_dir(src, "p", base=tiny_base)


def test_wrong_shapes_are_refused_naming_the_mismatch(tiny_base, tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorastack.base import Base

    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    other = Base.from_model(LlamaForCausalLM(cfg), tiny_tokenizer)
    src = make_peft_adapter(other, tmp_path / "wide")
    lib = Library(tmp_path / "lib")
    with pytest.raises(IncompatibleError, match=r"shape mismatch at .*q_proj.*96.*64 -> 64"):
        lib.import_dir(src, "wide", base=tiny_base)
    assert lib.names() == []
    # Same shapes, but a card claiming another base: refused, naming both fingerprints.
    ok = make_peft_adapter(tiny_base, tmp_path / "ok")
    (ok / "card.json").write_text(json.dumps({"name": "ok", "base_fingerprint": "0123456789abcdef"}))
    with pytest.raises(IncompatibleError, match=f"0123456789abcdef.*{tiny_base.fingerprint}"):
        lib.import_dir(ok, base=tiny_base)
    # A different random model with identical shapes has its own fingerprint.
    assert Base.from_model(make_tiny_model(len(tiny_tokenizer), seed=1), tiny_tokenizer).fingerprint != tiny_base.fingerprint


def test_add_is_atomic_under_failure(tiny_base, tmp_path, monkeypatch):
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "v1", seed=1), "x", base=tiny_base)
    before = lib.get("x").weights()

    import lorastack.library as library_mod

    def boom(*a, **k):
        raise KeyboardInterrupt  # as if Ctrl-C arrived while publishing

    monkeypatch.setattr(library_mod, "publish_dir", boom)
    for name in ("x", "y"):
        with pytest.raises(KeyboardInterrupt):
            lib.add(make_peft_adapter(tiny_base, tmp_path / f"v2{name}", seed=2), name, base=tiny_base, overwrite=True)
    monkeypatch.undo()
    lib2 = Library(tmp_path / "lib")
    assert lib2.names() == ["x"]
    after = lib2.get("x").weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in (tmp_path / "lib" / "adapters").iterdir()] == ["x"]


def test_crash_leftovers_are_swept_and_index_reconciled(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "a", base=tiny_base)
    lib.add(make_peft_adapter(tiny_base, tmp_path / "b"), "b", base=tiny_base)
    half = tmp_path / "lib" / "adapters" / ".tmp-half"
    half.mkdir()  # an interrupted write of a process that is gone (nobody holds its lock)
    os.utime(half, (time.time() - 60, time.time() - 60))
    import shutil

    shutil.rmtree(tmp_path / "lib" / "adapters" / "b")  # a directory lost behind the index's back
    lib2 = Library(tmp_path / "lib")
    assert lib2.names() == ["a"]
    assert not (tmp_path / "lib" / "adapters" / ".tmp-half").exists()


def test_sweep_spares_a_staging_dir_whose_owner_is_alive(tiny_base, tmp_path):
    """Opening the library (any CLI command) while another writer stages must not delete
    the writer's directory, however old it looks; once the owner lets go, it is swept."""
    from lorastack.atomic import staging_dir

    lib = Library(tmp_path / "lib")
    with staging_dir(lib.adapters_dir) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"partial")
        os.utime(tmp, (time.time() - 3600, time.time() - 3600))
        Library(tmp_path / "lib")
        assert (tmp / "adapter_model.safetensors").exists()
        young = lib.adapters_dir / ".tmp-just-made"
        young.mkdir()  # unlocked but inside the grace period: its owner may be about to lock it
        Library(tmp_path / "lib")
        assert young.exists()
        leaked = Path(str(tmp) + "-copy")
        shutil.copytree(tmp, leaked)  # same age, nobody holds it
        os.utime(leaked, (time.time() - 3600, time.time() - 3600))
        Library(tmp_path / "lib")
        assert not leaked.exists()
    assert not tmp.exists()


def test_errors_for_unknown_existing_and_traversal(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "reverse", base=tiny_base)
    with pytest.raises(NotFoundError, match="did you mean 'reverse'"):
        lib.get("revers")
    with pytest.raises(LorastackError, match="already exists"):
        lib.add(tmp_path / "a", "reverse", base=tiny_base)
    with pytest.raises(InvalidNameError):
        lib.remove("../lib")
    with pytest.raises(InvalidNameError):
        lib.add(tmp_path / "a", "../../evil", base=tiny_base)
    lib.remove("reverse")
    assert lib.names() == [] and not (tmp_path / "lib" / "adapters" / "reverse").exists()
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        lib.import_dir(tmp_path, "x", base=tiny_base)


def test_migrations_upgrade_an_old_index(tmp_path, tiny_base):
    root = tmp_path / "lib"
    root.mkdir()
    from lorastack.library import MIGRATIONS

    con = sqlite3.connect(root / "index.sqlite")
    con.executescript(MIGRATIONS[0])
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    lib = Library(root)
    assert lib.schema_version() == SCHEMA_VERSION >= 2
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "a", base=tiny_base)
    lib.put_signature("a", "test", b"\x00\x01", {"dim": 2})
    assert lib.signatures("test") == {"a": ({"dim": 2}, b"\x00\x01")}
    lib.remove("a")
    assert lib.signatures("test") == {}
    con = sqlite3.connect(root / "index.sqlite")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(LorastackError, match="newer than this lorastack"):
        Library(root)


def test_search_and_update_card(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "dates", base=tiny_base, card_updates={"description": "ISO dates to words"})
    lib.add(make_peft_adapter(tiny_base, tmp_path / "b"), "sums", base=tiny_base)
    assert [a.name for a in lib.search("iso")] == ["dates"]
    lib.update_card("sums", description="adds numbers")
    assert Library(tmp_path / "lib").get("sums").card.description == "adds numbers"


def test_signature_of_an_adapter_removed_meanwhile_is_not_found(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "a", base=tiny_base)
    lib.remove("a")
    with pytest.raises(NotFoundError, match="unknown adapter 'a'"):
        lib.put_signature("a", "knn:x", b"\x00")


def test_add_examples_appends_new_wordings_and_drops_the_signatures(tiny_base, tmp_path, monkeypatch):
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "a", base=tiny_base, examples=["one", "two"])
    lib.put_signature("a", "knn:x", b"\x00")
    weights = (lib.get("a").path / "adapter_model.safetensors").read_bytes()
    stamp = lib.examples_stamp(["a"])
    assert lib.add_examples("a", ["two", " three ", "three", "four"]) == (2, 4)  # stored and repeated texts are skipped
    assert Library(tmp_path / "lib").get("a").examples() == ["one", "two", "three", "four"]
    assert lib.signatures("knn:x") == {}  # every router recomputes this adapter's signatures
    assert lib.examples_stamp(["a"]) != stamp and (lib.get("a").path / "adapter_model.safetensors").read_bytes() == weights
    assert lib.add_examples("a", ["one"]) == (0, 4) and lib.examples_stamp(["a"]) == lib.examples_stamp(["a"])
    for bad, message in ((["ok", "  "], "example 2 is empty"), (["x" * 4001], "example 1 is 4001 characters"),
                         (["ok", "a\ud800b"], "example 2: not valid Unicode text")):
        with pytest.raises(LorastackError, match=message):
            lib.add_examples("a", bad)
    monkeypatch.setattr("lorastack.library.MAX_STORED_EXAMPLES", 5)
    with pytest.raises(LorastackError, match="4 stored examples \\+ 2 new would exceed 5"):
        lib.add_examples("a", ["five", "six"])
    assert lib.get("a").examples() == ["one", "two", "three", "four"]  # a refused call changes nothing
    with pytest.raises(NotFoundError, match="unknown adapter 'b'"):
        lib.add_examples("b", ["x"])
    with pytest.raises(LorastackError):
        lib.add_examples("../a", ["x"])
