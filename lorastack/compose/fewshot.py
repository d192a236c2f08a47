"""Few-shot composition (LoraHub): mixture weights over library adapters from 5-20 examples.

The objective is LoraHub's: the mean cross-entropy per completion token of the examples
under the weighted sum of the candidates' updates, plus `l1 * sum |w_k|` (which keeps
weights small and lets useless candidates fall to zero). Two searches over the K weights:

- `cma` (gradient-free, LoraHub's choice in spirit; LoraHub used nevergrad, CMA-ES is the
  same family of optimiser in a small pure-Python package): each generation's population
  is scored in one packed forward through the engine's scoring call (engine/score.py).
- `gradient`: Adam on the K scalars alone, backpropagating through the frozen base (the
  weights enter the forward linearly, so the gradient is exact and cheap to hold).

`gradient` is the default: on `python bench/compose.py` (8 candidates, 3 held-out families,
k = 5 and 20) it reached a lower few-shot loss than CMA-ES in every cell and a higher mean
exact match, in about the same time.

Both start from the uniform mixture (`1/K` each), which is evaluated first, so the result
never scores worse than the uniform mixture on the examples. `budget` counts loss
evaluations of one weighting on all examples (forward-equivalents): CMA spends them as
population members, gradient descent as steps of about three each (forward + backward).
Seeded: the same data, candidates, budget and seed give the same weights.

How a result is stored: **materialised as a `cat` adapter** — the candidates' factors
stacked, B scaled by the found weights (zero weights dropped). It is exact (the same
update as the mixture the search scored), it is an ordinary PEFT directory, so `--model
NEW` works unchanged in the CLI, the server, routing (`auto`), export and PEFT itself,
and it stays valid when a parent is later removed or replaced, so the library needs no
parent tracking or refusal rules. The cost is rank: the sum of the kept candidates'
ranks (8 x r16 = 128), which grows the engine's slot size; `svd_rank` compresses it
(lossy) when that matters. The card records candidates, weights, losses and options, so
the mixture can also be served without the new weights as a SPEC `a:w1+b:w2` (positive
weights) — tests/test_compose.py checks that both give the same outputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..adapter import Adapter, LoraPairs
from ..data import Record, messages_of, read_jsonl
from ..engine.score import MixtureLora, completion_logprobs
from ..errors import DataError
from .merge import ComposeError, add_composed, load_parents, merge_pairs
from .subtract import subtract_general

if TYPE_CHECKING:
    from ..base import Base
    from ..library import Library
    from ..runtime import Runtime

SEARCHES = ("cma", "gradient")
MAX_EXAMPLES = 64  # few-shot means few: more belongs in `lorastack train`
WEIGHT_BOUND = 1.5  # LoraHub's box for each weight
DROP_BELOW = 1e-3  # |weight| under this is dropped from the materialised adapter
MAX_TOKENS_PER_FORWARD = 4096  # rows are chunked so activations stay small


@dataclass
class FewshotResult:
    candidates: list[str]
    weights: list[float]
    loss: float  # mean NLL per completion token under the found weights (no L1 term)
    uniform_loss: float  # the same for the uniform mixture (the starting point)
    search: str
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)  # best objective after each round

    def to_json(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "weights": [round(w, 6) for w in self.weights], "loss": self.loss,
                "uniform_loss": self.uniform_loss, "search": self.search, "evaluations": self.evaluations,
                "seconds": round(self.seconds, 2)}


def read_fewshot(path: str | Path) -> list[Record]:
    """The few-shot examples; one-line errors for a missing, empty or malformed file."""
    try:
        records = read_jsonl(path)
    except DataError as e:
        raise ComposeError(f"few-shot data: {e}") from None
    if len(records) > MAX_EXAMPLES:
        raise ComposeError(f"{path}: {len(records)} examples; few-shot composition takes at most {MAX_EXAMPLES} "
                           "(train an adapter on larger sets)")
    return records


class FewshotScorer:
    """Mean NLL per completion token of fixed examples under per-row mixture weightings.

    Wraps the engine's runner with a `MixtureLora` over the candidates (plus, with
    GenKnowSub, the general adapter, weighted `-sum(w)`), and scores J weightings x N
    examples as rows of packed forwards.
    """

    def __init__(self, runner, base: "Base", records: Sequence[Record], candidates: Sequence[LoraPairs],
                 general: LoraPairs | None = None) -> None:
        if not records:
            raise ComposeError("few-shot composition needs at least one example")
        self.runner = runner
        self.k = len(candidates)
        self.general = general is not None
        mix = list(candidates) + ([general] if general is not None else [])
        self.lora = MixtureLora(runner.groups, mix, runner.dtype)
        self.seqs = [(base.chat_ids(messages_of(r)), base.completion_ids(r["completion"])) for r in records]
        self.tokens = sum(len(c) for _, c in self.seqs)
        self.evaluations = 0

    def _full(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, -w.sum(1, keepdim=True)], 1) if self.general else w

    def _chunks(self) -> list[list[int]]:
        out, cur, size = [], [], 0
        for i, (p, c) in enumerate(self.seqs):
            n = len(p) + len(c)
            if cur and size + n > MAX_TOKENS_PER_FORWARD:
                out.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        return out + [cur]

    def losses(self, weights: torch.Tensor) -> torch.Tensor:
        """Loss of each weighting `[J, K]` (no grad), scored as J x N rows per forward."""
        weights = torch.as_tensor(weights, dtype=torch.float32).view(-1, self.k)
        per_forward = max(1, MAX_TOKENS_PER_FORWARD // max(1, sum(len(p) + len(c) for p, c in self.seqs)))
        out = []
        with torch.no_grad():
            for lo in range(0, weights.shape[0], per_forward):
                w = weights[lo : lo + per_forward]
                total = torch.zeros(w.shape[0])
                for idx in self._chunks() if per_forward == 1 else [list(range(len(self.seqs)))]:
                    seqs = [self.seqs[i] for i in idx] * w.shape[0]
                    rows = self._full(w).repeat_interleave(len(idx), 0)
                    self.lora.set_rows(rows, [len(p) + len(c) for p, c in seqs])
                    sums, _ = completion_logprobs(self.runner, seqs, self.lora)
                    total += -sums.view(w.shape[0], len(idx)).sum(1)
                out.append(total / self.tokens)
        self.evaluations += weights.shape[0]
        return torch.cat(out)

    def loss_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Loss of one weighting `[K]` and its gradient (chunks accumulate gradients)."""
        w = w.detach().clone().requires_grad_(True)
        total = 0.0
        # Only w needs a gradient: a base loaded with trainable parameters would otherwise
        # get gradients for all of its weights (time and memory for nothing).
        frozen = [p for p in self.runner.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            for idx in self._chunks():
                seqs = [self.seqs[i] for i in idx]
                self.lora.set_rows(self._full(w.view(1, -1)).expand(len(idx), -1), [len(p) + len(c) for p, c in seqs])
                sums, _ = completion_logprobs(self.runner, seqs, self.lora)
                loss = -sums.sum() / self.tokens
                loss.backward()
                total += float(loss.detach())
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.evaluations += 3  # forward + backward ~ three forwards
        return total, w.grad.detach()


def check_search_options(search: str, budget: int, l1: float, top: int = 1) -> None:
    """The search's options, checked on their own so the CLI can refuse them before the base loads."""
    if search not in SEARCHES:
        raise ComposeError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    if budget < 1:
        raise ComposeError(f"--budget must be >= 1, got {budget}")
    if not (l1 >= 0 and np.isfinite(l1)):
        raise ComposeError(f"--l1 must be a finite number >= 0, got {l1}")
    if top < 1:
        raise ComposeError(f"--top must be >= 1, got {top}")


def search_weights(scorer: FewshotScorer, *, search: str = "gradient", budget: int = 40, l1: float = 0.05, seed: int = 0,
                   progress: Callable[[int, float], None] | None = None) -> tuple[list[float], float, list[float]]:
    """Minimise `loss(w) + l1 * |w|_1` within `budget` forward-equivalents; returns
    (best weights, their loss without L1, best objective after each round)."""
    check_search_options(search, budget, l1)
    k = scorer.k
    x0 = np.full(k, 1.0 / k)
    loss0 = float(scorer.losses(torch.tensor(x0[None], dtype=torch.float32))[0])
    best = (loss0 + l1 * np.abs(x0).sum(), x0.copy(), loss0)
    history = [best[0]]
    if progress:
        progress(scorer.evaluations, best[0])
    torch.manual_seed(seed)
    if search == "cma":
        import cma

        popsize = 4 + int(3 * math.log(k))  # CMA-ES's default population
        es = cma.CMAEvolutionStrategy(x0.tolist(), 0.3, {
            "seed": seed + 1, "popsize": popsize, "bounds": [-WEIGHT_BOUND, WEIGHT_BOUND], "verbose": -9,
            "maxfevals": budget})
        while scorer.evaluations < budget and not es.stop():
            xs = es.ask(number=min(popsize, budget - scorer.evaluations)) if scorer.evaluations + popsize > budget else es.ask()
            losses = scorer.losses(torch.tensor(np.array(xs), dtype=torch.float32)).numpy()
            objs = [float(lo + l1 * np.abs(x).sum()) for lo, x in zip(losses, xs)]
            if len(xs) == popsize:
                es.tell(xs, objs)
            i = int(np.argmin(objs))
            if objs[i] < best[0]:
                best = (objs[i], np.array(xs[i]), float(losses[i]))
            history.append(best[0])
            if progress:
                progress(scorer.evaluations, best[0])
    else:
        w = torch.tensor(x0, dtype=torch.float32)
        opt = torch.optim.Adam([w], lr=0.1)
        while scorer.evaluations + 3 <= budget:
            loss, grad = scorer.loss_and_grad(w)
            obj = loss + l1 * float(w.abs().sum())
            if obj < best[0]:
                best = (obj, w.detach().numpy().copy(), loss)
            w.grad = grad + l1 * torch.sign(w.detach())
            opt.step()
            with torch.no_grad():
                w.clamp_(-WEIGHT_BOUND, WEIGHT_BOUND)
            history.append(best[0])
            if progress:
                progress(scorer.evaluations, best[0])
    return [float(x) for x in best[1]], best[2], history


def pick_candidates(runtime: "Runtime", records: Sequence[Record], top: int, exclude: Sequence[str] = ()) -> list[str]:
    """The `top` adapters the default router picks most often (then by summed router score)
    for the examples' prompts; the rest of the library fills up if it picks fewer."""
    from ..data import prompt_text

    served = [n for n in runtime.served() if n not in exclude and runtime.fits(n)]
    if not served:
        raise ComposeError("the library has no adapters to compose")
    votes: dict[str, float] = {n: 0.0 for n in served}
    scores: dict[str, float] = {n: 0.0 for n in served}
    for d in runtime.router().route([prompt_text(r) for r in records]):
        for n, w in d.route.entries:
            if n in votes:
                votes[n] += w
        for n, s in (d.scores or {}).items():
            if n in scores and isinstance(s, (int, float)) and math.isfinite(s):
                scores[n] += float(s)
    return sorted(served, key=lambda n: (-votes[n], -scores[n], n))[:top]


def fewshot_search(runtime: "Runtime", records: Sequence[Record], *, candidates: Sequence[str] | None = None, top: int = 8,
                   search: str = "gradient", budget: int = 40, l1: float = 0.05, seed: int = 0, subtract: str | None = None,
                   progress: Callable[[int, float], None] | None = None) -> FewshotResult:
    """Find mixture weights over library adapters for the examples (no library change)."""
    from ..engine.engine import Engine

    if not isinstance(runtime.generator, Engine):
        raise ComposeError("few-shot composition needs the engine (a Llama-family base)")
    if not records:
        raise ComposeError("few-shot composition needs at least one example")
    if candidates is None:
        if top < 1:
            raise ComposeError(f"--top must be >= 1, got {top}")
        candidates = pick_candidates(runtime, records, top, exclude=[subtract] if subtract else [])
    candidates = list(candidates)
    if subtract and subtract in candidates:
        raise ComposeError(f"--subtract {subtract!r} is also a candidate")
    for name in candidates + ([subtract] if subtract else []):
        runtime.route(name)  # unknown / hidden / other-base adapters fail here, one line
    _, pairs = load_parents(runtime.library, candidates + ([subtract] if subtract else []))
    general = pairs.pop() if subtract else None
    t0 = time.perf_counter()
    scorer = FewshotScorer(runtime.generator.runner, runtime.base, records, pairs, general)
    uniform = float(scorer.losses(torch.full((1, len(pairs)), 1.0 / len(pairs)))[0])
    scorer.evaluations = 0
    weights, loss, history = search_weights(scorer, search=search, budget=budget, l1=l1, seed=seed, progress=progress)
    return FewshotResult(candidates, weights, loss, uniform, search, scorer.evaluations, time.perf_counter() - t0, history)


def fewshot(runtime: "Runtime", records: Sequence[Record], name: str, *, candidates: Sequence[str] | None = None, top: int = 8,
            search: str = "gradient", budget: int = 40, l1: float = 0.05, seed: int = 0, subtract: str | None = None,
            svd_rank: int | None = None, overwrite: bool = False,
            progress: Callable[[int, float], None] | None = None) -> tuple[Adapter, FewshotResult]:
    """Search weights, then add the composed adapter `name` (the CLI's `compose fewshot`).

    The name is checked before the search, so a clash costs nothing; an interrupt during
    the search or the write leaves the library unchanged (Library.add is atomic).
    """
    runtime.library.check_new(name, overwrite, ComposeError)
    if candidates is not None and name in candidates:
        raise ComposeError(f"the new adapter cannot replace its own candidate {name!r}")
    result = fewshot_search(runtime, records, candidates=candidates, top=top, search=search, budget=budget, l1=l1,
                            seed=seed, subtract=subtract, progress=progress)
    adapters, pairs = load_parents(runtime.library, result.candidates + ([subtract] if subtract else []))
    general = pairs.pop() if subtract else None
    kept = [(p, w) for p, w in zip(pairs, result.weights) if abs(w) >= DROP_BELOW]
    if not kept:
        raise ComposeError("the search put every weight at zero (the base alone fits the examples best); "
                           "lower --l1 or use the base")
    parents, weights = [p for p, _ in kept], [w for _, w in kept]
    if general is not None:
        parents, weights = subtract_general(parents, weights, general, "cat")
    merged = merge_pairs(parents, weights, "svd" if svd_rank else "cat", svd_rank=svd_rank, name=name)
    composition = {
        "kind": "fewshot", "search": search, "budget": budget, "l1": l1, "seed": seed, "examples": len(records),
        "parents": [{"name": n, "weight": w} for n, w in zip(result.candidates, result.weights)],
        "loss": result.loss, "uniform_loss": result.uniform_loss, "subtract": subtract,
        "method": "svd" if svd_rank else "cat", "svd_rank": svd_rank,
    }
    from ..data import prompt_text

    adapter = add_composed(runtime.library, merged, name, adapters, composition,
                           f"few-shot composition ({search}) of {', '.join(result.candidates)}",
                           overwrite=overwrite, examples=[prompt_text(r) for r in records])
    runtime.refresh(name)
    return adapter, result
