"""Training checkpoints: everything a killed run needs to finish exactly as if it had not been.

A checkpoint holds the LoRA weights, the optimizer's state, the RNG states, the step reached
(the data order is a function of the seed, so the step is the position in it), the losses so
far and the early-stopping state. Tensors go to safetensors and the rest to JSON: nothing is
unpickled on resume.

Checkpoints live outside the library, under `$LORASTACK_HOME/cache/checkpoints/<library>/<name>/`, and
are published with one rename like every other write, so a kill mid-write leaves the previous
checkpoint intact. A run's key (data, settings, base) is stored with it: `--resume` refuses a
checkpoint made for something else instead of silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import publish_dir, staging_dir, sweep_tmp
from .errors import LorastackError
from .paths import lorastack_home

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"


class CheckpointMismatch(LorastackError):
    """A --resume whose checkpoint belongs to another run: nothing was resumed, so the
    "run the same command with --resume" hint does not apply."""


def checkpoint_dir(library_root: Path, name: str) -> Path:
    """Where adapter `name` of the library at `library_root` keeps its checkpoint.

    Under `$LORASTACK_HOME/cache/`, deliberately not `$LORASTACK_CACHE`: that one is for
    derived data several homes may share (the dequantized base); a checkpoint is one
    home's unfinished work.
    """
    lib = hashlib.sha256(str(Path(library_root).expanduser().resolve()).encode()).hexdigest()[:12]
    return lorastack_home() / "cache" / "checkpoints" / lib / name


def run_key(parts: Any) -> str:
    """A digest of what makes two runs the same run (records, settings, base fingerprint)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainState:
    """The loop's state besides the model and optimizer (plain values, JSON-able)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False


def save(path: Path, key: str, state: TrainState, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         rng: random.Random, best: dict[str, torch.Tensor] | None) -> None:
    """Write a checkpoint atomically (replacing the previous one)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().clone().contiguous() for k, v in params.items()}
    if best is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best.items()})
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    version, internal, gauss = rng.getstate()
    meta = {"key": key, "state": state.__dict__, "param_groups": opt["param_groups"],
            "rng_python": [version, list(internal), gauss], "has_best": best is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_tmp(path.parent)
    with staging_dir(path.parent) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(meta), encoding="utf-8")
        publish_dir(tmp, path, replace=True)


def load(path: Path, key: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         rng: random.Random) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Restore a checkpoint into `params` (in place), `optimizer` and `rng`; returns the loop
    state and the best weights seen (early stopping), if any."""
    from safetensors.torch import load_file

    if not (path / STATE_FILE).is_file():
        raise LorastackError(f"no checkpoint to resume at {path}; start without --resume")
    try:
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(path / TENSORS_FILE))
    except (OSError, ValueError) as e:
        raise LorastackError(f"checkpoint at {path} is unreadable ({e}); start without --resume") from None
    if meta.get("key") != key:
        raise CheckpointMismatch(f"the checkpoint at {path} was made with other data, settings or base; "
                             "start without --resume (it will be replaced)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = meta["rng_python"]
    rng.setstate((version, tuple(internal), gauss))
    state = TrainState(**{**meta["state"], "eval_curve": [tuple(x) for x in meta["state"]["eval_curve"]]})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} if meta.get("has_best") else None
    return state, best


def discard(path: Path) -> None:
    """Remove a finished run's checkpoint (and its library's folder when it was the last)."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass
