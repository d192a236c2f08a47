"""LoRA training with PEFT: completion-only loss, bf16 autocast, deterministic by seed.

The adapter is built in a staging directory and handed to the Library only when training
and evaluation have finished, so an interrupted or failed run leaves the library as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .adapter import MAX_ALPHA, MAX_RANK, PLOT_FILE
from .atomic import staging_dir, sweep_tmp
from .base import Base
from .data import Record, messages_of, prompt_text, split_holdout
from .errors import LorastackError

if TYPE_CHECKING:
    from .adapter import Adapter
    from .library import Library

IGNORE = -100
TRAIN_SCRATCH_PREFIX = "lorastack-train-"


@dataclass
class TrainConfig:
    """Defaults suit the built-in tasks on the embedded base: tens of steps, not thousands."""

    rank: int = 16
    alpha: float = 32.0
    targets: list[str] | str = "all-linear"
    dropout: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    warmup: int = 5
    batch_size: int = 8
    max_len: int = 256
    seed: int = 0
    autocast_bf16: bool = True
    eval_fraction: float = 0.1
    eval_n: int | None = None  # held-out records taken from the data (default: eval_fraction, at most 200)
    eval_generate: int = 64
    weight_decay: float = 0.0
    # A checkpoint every this many steps (0: none) lets `--resume` continue a killed run.
    checkpoint_every: int = 20
    # Early stopping: stop after this many held-out evaluations without a better loss (None: off).
    early_stop: int | None = None
    eval_every: int = 20

    def validate(self) -> None:
        checks = [
            # The library refuses to load an adapter past these limits, so training one would be wasted.
            (1 <= self.rank <= MAX_RANK, f"rank must be between 1 and {MAX_RANK}, got {self.rank}"),
            (math.isfinite(self.alpha) and 0 < self.alpha <= MAX_ALPHA, f"alpha must be in (0, {MAX_ALPHA:g}], got {self.alpha}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.max_len >= 8, f"max-len must be >= 8, got {self.max_len}"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0), f"epochs must be a finite number > 0, got {self.epochs}"),
            (not (self.steps and self.epochs), "give --steps or --epochs, not both"),
            (self.eval_n is None or self.eval_n >= 0, f"eval-n must be >= 0, got {self.eval_n}"),
            (self.checkpoint_every >= 0, f"checkpoint-every must be >= 0, got {self.checkpoint_every}"),
            (self.early_stop is None or self.early_stop >= 1, f"early-stop patience must be >= 1, got {self.early_stop}"),
            (self.eval_every >= 1, f"eval-every must be >= 1, got {self.eval_every}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LorastackError(msg)


@dataclass
class TrainResult:
    adapter_dir: Path
    card: dict[str, Any]
    losses: list[float] = field(default_factory=list)


class StepHook(Protocol):
    """Called after every optimizer step (and its checkpoint) with the step count and loss."""

    def __call__(self, step: int, loss: float) -> None: ...


# ---------------------------------------------------------------- tokenisation
def build_example(base: Base, record: Record, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels with the prompt masked, so loss counts completion tokens only.

    An over-long example keeps its whole completion and loses the start of the prompt:
    the answer is what is being taught.
    """
    prompt = base.chat_ids(messages_of(record))
    target = base.completion_ids(record["completion"])
    if len(target) >= max_len:
        raise LorastackError(f"a completion is {len(target)} tokens, longer than --max-len {max_len}")
    prompt = prompt[-(max_len - len(target)) :]
    return prompt + target, [IGNORE] * len(prompt) + target


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(n: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """Shuffled epochs cut into batches, enough for `steps` optimizer steps."""
    order: list[int] = []
    out: list[list[int]] = []
    while len(out) < steps:
        if len(order) < batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * 0.9 + 0.1


def _targets(base: Base, targets: list[str] | str) -> list[str] | str:
    if targets == "all-linear" or targets == ["all-linear"]:
        return base.target_module_names()
    names = [targets] if isinstance(targets, str) else list(targets)
    known = set(base.target_module_names())
    bad = [t for t in names if t not in known]
    if bad:
        raise LorastackError(f"unknown target module(s) {bad}; this base has: {', '.join(sorted(known))}")
    return names


@torch.no_grad()
def eval_loss(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, autocast: bool) -> float:
    """Mean completion-token loss (token-weighted) over held-out examples."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(out.loss) * n
        count += n
    return total / max(count, 1)


def holdout(records: list[Record], config: TrainConfig, log: Callable[[str], None]) -> tuple[list[Record], list[Record]]:
    """Split off the held-out records and say so: a silent 10% is data the user did not know
    they were not training on."""
    if config.eval_n is not None and config.eval_n >= len(records):
        raise LorastackError(f"--eval-n {config.eval_n} leaves nothing to train on ({len(records)} records)")
    train, held = split_holdout(records, config.eval_fraction, config.seed, n=config.eval_n)
    share = len(held) / max(1, len(records))
    log(f"held out {share:.0%} (n={len(held)}) of {len(records)} records for eval; --eval-n to change")
    return train, held


def train_adapter(
    base: Base,
    records: list[Record],
    name: str,
    config: TrainConfig,
    out_dir: Path,
    eval_records: list[Record] | None = None,
    description: str = "",
    data_info: dict[str, Any] | None = None,
    scorer: Callable[[str, Record], bool] | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_step: StepHook | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train one LoRA on `records` and write it (PEFT files + card + loss plot) into `out_dir`.

    With `checkpoint`, the run's state is saved there every `config.checkpoint_every` steps
    and `resume` continues from it: same seed, same data -> the same adapter as an
    uninterrupted run. The checkpoint is left in place; the caller discards it once the
    adapter is safely stored.
    """
    from peft import LoraConfig, get_peft_model

    config.validate()
    log = log or (lambda _msg: None)
    if not records:
        raise LorastackError("no training records")
    if eval_records is None:
        records, eval_records = holdout(records, config, log)
    else:
        log(f"eval on the given held-out records (n={len(eval_records)})")
    train_ex = [build_example(base, r, config.max_len) for r in records]
    eval_ex = [build_example(base, r, config.max_len) for r in eval_records]
    steps = config.steps or max(1, math.ceil((config.epochs or 1.0) * len(train_ex) / config.batch_size))
    if config.early_stop and not eval_ex:
        raise LorastackError("--early-stop needs held-out records (--eval-n > 0 or --eval FILE)")

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    # Train on a float32 copy so the shared Base stays frozen and unwrapped; autocast gives
    # the bf16 speed while the LoRA weights and optimizer state stay float32.
    model = copy.deepcopy(base.model).float()
    lora_cfg = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=_targets(base, config.targets),
        lora_dropout=config.dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_cfg)
    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    pad = base.tokenizer.pad_token_id
    batches = _batches(len(train_ex), config.batch_size, steps, rng)

    # Settings that cannot change the trained weights may differ on resume.
    inert = {"checkpoint_every", "eval_generate"} | (set() if config.early_stop else {"eval_every"})
    key = ckpt.run_key({"train": train_ex, "eval": eval_ex, "base": base.fingerprint,
                        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in inert}})
    state, best = ckpt.TrainState(), None
    if resume:
        if checkpoint is None:
            raise LorastackError("--resume needs a checkpoint location")
        state, best = ckpt.load(checkpoint, key, named, opt, rng)
        log(f"resuming {name} at step {state.step} of {steps} from {checkpoint}")

    t0 = time.perf_counter() - state.seconds
    peft_model.train()
    bar = tqdm(total=steps, initial=state.step, desc=f"train {name}", unit="step", disable=not progress)
    for step in range(state.step, steps):
        if state.stopped_early:
            break
        for g in opt.param_groups:
            g["lr"] = config.lr * _lr_at(step, steps, config.warmup)
        batch = collate([train_ex[i] for i in batches[step]], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
            out = peft_model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.tokens += int(batch["attention_mask"].sum())
        state.losses.append(float(out.loss.detach()))
        state.step = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{state.losses[-1]:.3f}")
        if config.early_stop and state.step % config.eval_every == 0 and state.step < steps:
            best = _early_stop_check(peft_model, named, eval_ex, pad, config, state, best, log)
        if checkpoint is not None and config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < steps:
            state.seconds = time.perf_counter() - t0
            ckpt.save(checkpoint, key, state, named, opt, rng, best)
        if on_step is not None:
            on_step(state.step, state.losses[-1])
    bar.close()
    seconds = time.perf_counter() - t0
    if state.stopped_early and best is not None:
        with torch.no_grad():  # the weights of the best held-out loss, not the last
            for k, p in named.items():
                p.copy_(best[k])
    peft_model.eval()

    losses = state.losses
    metrics: dict[str, Any] = {"train_loss_first": losses[0], "train_loss_last": sum(losses[-5:]) / len(losses[-5:])}
    if eval_ex:
        metrics["eval_loss"] = eval_loss(peft_model, eval_ex, pad, config.batch_size * 2, config.autocast_bf16)
        if scorer and config.eval_generate:
            metrics.update(_eval_exact_match(base, peft_model, eval_records[: config.eval_generate], scorer))

    with warnings.catch_warnings():
        # PEFT looks for the base's config.json next to the path it recorded, to see whether
        # the embeddings were resized; the embedded base is a GGUF, whose folder has none, and
        # this trainer never resizes them: the warning would only alarm.
        warnings.filterwarnings("ignore", message="Could not find a config file")
        peft_model.save_pretrained(out_dir)
    from .plots import loss_curve

    loss_curve(losses, state.eval_curve, metrics.get("eval_loss"), out_dir / PLOT_FILE, title=f"{name}: training loss")
    card = {
        "name": name,
        "description": description,
        "base_fingerprint": base.fingerprint,
        "base_name": base.name,
        "rank": config.rank,
        "alpha": config.alpha,
        "target_modules": sorted(lora_cfg.target_modules),
        "data": {**(data_info or {}), "n_train": len(train_ex), "n_eval": len(eval_ex)},
        "training": {
            **{k: v for k, v in dataclasses.asdict(config).items() if k != "targets"},
            "steps": steps,
            "steps_run": state.step,
            "seconds": round(seconds, 2),
            "tokens": state.tokens,
            "tokens_per_s": round(state.tokens / seconds, 1) if seconds > 0 else None,
            "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
            **({"eval_curve": [[s, round(v, 4)] for s, v in state.eval_curve]} if state.eval_curve else {}),
            **({"stopped_early": True, "best_step": state.best_step} if state.stopped_early else {}),
        },
        "metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
    }
    return TrainResult(adapter_dir=out_dir, card=card, losses=losses)


def _early_stop_check(peft_model: torch.nn.Module, named: dict[str, torch.Tensor], eval_ex: list[tuple[list[int], list[int]]],
                      pad: int, config: TrainConfig, state: "ckpt.TrainState", best: dict[str, torch.Tensor] | None,
                      log: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
    """Evaluate held-out loss; remember the best weights; mark the run stopped after
    `config.early_stop` evaluations without improvement. Returns the best weights."""
    peft_model.eval()
    loss = eval_loss(peft_model, eval_ex, pad, config.batch_size * 2, config.autocast_bf16)
    peft_model.train()
    state.eval_curve.append((state.step, loss))
    if state.best_loss is None or loss < state.best_loss:
        state.best_loss, state.best_step, state.bad_evals = loss, state.step, 0
        return {k: p.detach().clone() for k, p in named.items()}
    state.bad_evals += 1
    if state.bad_evals >= (config.early_stop or 0):
        state.stopped_early = True
        log(f"early stop at step {state.step}: held-out loss {loss:.4f}, best {state.best_loss:.4f} at step {state.best_step}")
    return best


def _eval_exact_match(base: Base, peft_model: torch.nn.Module, records: list[Record], scorer: Callable[[str, Record], bool]) -> dict[str, Any]:
    """Exact match of the freshly trained adapter on held-out records (generated greedily)."""
    from .engine.generate import Generator
    from .eval import evaluate
    from .route import BASE_ROUTE

    # The trained PEFT model stands in as the "base" of a throwaway generator.
    gen = Generator(dataclasses.replace(base, model=peft_model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = evaluate(gen, BASE_ROUTE, records, scorer, progress=False)
    return {"eval_exact_match": result.accuracy, "eval_exact_match_n": result.n}


def sample_prompts(records: list[Record], n: int, seed: int) -> list[str]:
    """A seeded sample of training inputs, stored with the adapter for routing signatures."""
    texts = [prompt_text(r) for r in records]
    rng = random.Random(seed)
    return rng.sample(texts, min(n, len(texts)))



def train_to_library(
    base: Base,
    library: "Library",
    records: list[Record],
    name: str,
    config: TrainConfig,
    eval_records: list[Record] | None = None,
    description: str = "",
    data_info: dict[str, Any] | None = None,
    scorer: Callable[[str, Record], bool] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    n_examples: int = 64,
    resume: bool = False,
    on_step: StepHook | None = None,
    log: Callable[[str], None] | None = None,
    card: dict[str, Any] | None = None,
) -> "Adapter":
    """Train and add to the library in one step; nothing reaches the library unless all succeed.

    `card` adds fields to the new adapter's card (e.g. `routable: False`) in the same write.

    The name is checked before training so a typo costs seconds, not a training run.
    Checkpoints go to `checkpoint_for(library, name)` (outside the library); a run that
    fails or is killed leaves its last one there for `resume`, a finished run removes it.
    """
    library.check_new(name, overwrite)
    # The scratch directory is locked by this process; runs that were killed (SIGKILL skips
    # every cleanup) leave theirs unlocked, and the next run sweeps them.
    scratch_root = Path(tempfile.gettempdir())
    sweep_tmp(scratch_root, prefix=TRAIN_SCRATCH_PREFIX)
    checkpoint = checkpoint_for(library, name)
    with staging_dir(scratch_root, prefix=TRAIN_SCRATCH_PREFIX) as tmp:
        result = train_adapter(
            base, records, name, config, Path(tmp), eval_records=eval_records, description=description,
            data_info=data_info, scorer=scorer, progress=progress, checkpoint=checkpoint, resume=resume,
            on_step=on_step, log=log,
        )
        adapter = library.add(
            Path(tmp), name, base=base, card_updates={**result.card, **(card or {})},
            examples=sample_prompts(records, n_examples, config.seed), overwrite=overwrite,
        )
    ckpt.discard(checkpoint)
    return adapter


def checkpoint_for(library: "Library", name: str) -> Path:
    """Where training adapter `name` for `library` keeps its resume checkpoint."""
    return ckpt.checkpoint_dir(library.root, name)
