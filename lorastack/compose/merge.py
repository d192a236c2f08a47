"""Merge library adapters into one new adapter: linear, cat, svd, ties, dare, magnitude_prune.

The methods mean what PEFT's `add_weighted_adapter` means by them, with ties / dare_* /
magnitude_prune taken in PEFT's `*_svd` sense (on each module's dense update `B @ A`, the
papers' parameter space, then factored back to `--svd-rank`), because trimming or electing
signs on A and B separately (PEFT's plain `ties`) has no meaning for their product:

| method          | new update per module                                    | rank       |
|-----------------|----------------------------------------------------------|------------|
| linear          | `(sum_i sqrt(w_i) B_i) (sum_i sqrt(w_i) A_i)` (PEFT's; approximate, same ranks required) | r |
| cat             | `sum_i w_i B_i A_i`, exact (factors stacked)             | sum of r_i |
| svd             | `sum_i w_i B_i A_i`, truncated to svd_rank               | svd_rank   |
| ties            | TIES on the dense updates: trim to top-density magnitudes, elect sign, disjoint mean | svd_rank |
| dare_linear     | DARE: drop with p = 1 - density, rescale by 1/density, weighted sum | svd_rank |
| dare_ties       | DARE drop/rescale, then TIES sign election and disjoint mean | svd_rank |
| magnitude_prune | trim to top-density magnitudes, weighted sum             | svd_rank   |

Why not call `add_weighted_adapter` itself: it needs the base model instantiated with
every parent loaded into one PeftModel (the embedded GGUF base must be dequantised
first), while a merge only needs the adapter files; and its `svd` decomposes every dense
`[out, in]` update although a weighted sum of LoRAs has rank at most `sum r_i`, so QR of
the stacked factors plus an SVD of the small core gives the same factors far faster
(`_lowrank_svd`). Sign election, disjoint merge and DARE's drops are PEFT's own
(`peft.utils.merge_utils`); the magnitude trim and the truncation of a dense merged update
are ours because PEFT's took most of a merge's time (`topk` with k = half the entries, a
full SVD per module: a 4-adapter TIES merge of the embedded base ran 5.8x faster without
them, `python bench/merge.py`). tests/test_compose.py checks linear/cat/svd against
`add_weighted_adapter` on the same parents, and the trim against PEFT's.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..adapter import Adapter, LoraPairs, write_peft_dir
from ..errors import IncompatibleError, LorastackError

if TYPE_CHECKING:
    from ..library import Library

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # work on dense B @ A
DEFAULT_DENSITY = 0.5
EXAMPLES_PER_PARENT = 32  # routing examples a merged adapter inherits from each parent


class ComposeError(LorastackError):
    """Bad input to a composition: parents, weights, method options or few-shot data."""


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """`"0.7,0.3"` -> [0.7, 0.3]; None when not given. One weight per parent, finite, not all zero."""
    if text is None or text.strip() == "":
        return None
    try:
        weights = [float(t) for t in text.split(",")]
    except ValueError:
        raise ComposeError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None
    if len(weights) != n:
        raise ComposeError(f"--weights {text!r}: {len(weights)} weights for {n} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise ComposeError(f"--weights {text!r}: weights must be finite numbers")
    if all(w == 0 for w in weights):
        raise ComposeError(f"--weights {text!r}: all weights are zero")
    return weights


def default_weights(method: str, n: int) -> list[float]:
    """1/n for the additive methods (an average: a sum of n full-strength updates
    overshoots); 1 for ties/dare_ties, whose disjoint mean already averages."""
    return [1.0] * n if method in ("ties", "dare_ties") else [1.0 / n] * n


def check_parents(parents: Sequence[LoraPairs], method: str) -> None:
    """One-line errors for parent sets a method cannot combine."""
    if method not in METHODS:
        raise ComposeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if not parents:
        raise ComposeError("merge needs at least one adapter")
    shapes: dict[str, tuple[int, int]] = {}
    for p in parents:
        for module, (a, b) in p.modules.items():
            shape = (a.shape[1], b.shape[0])
            if shapes.setdefault(module, shape) != shape:
                raise IncompatibleError(f"adapters disagree on the shape of {module}: {shapes[module]} vs {shape} (different bases?)")
    if method == "cat" or method == "svd":
        return  # a module some parents lack contributes nothing from them: still exact
    first = parents[0]
    for p in parents[1:]:
        if set(p.modules) != set(first.modules):
            only = sorted(set(p.modules) ^ set(first.modules))[0]
            raise IncompatibleError(
                f"{method} needs adapters with the same target modules: {first.name!r} targets {','.join(first.targets)}, "
                f"{p.name!r} targets {','.join(p.targets)} (e.g. {only}); use --method cat or svd")
        if method == "linear" and p.rank != first.rank:
            raise IncompatibleError(
                f"linear needs adapters of one rank: {first.name!r} has r={first.rank}, {p.name!r} r={p.rank}; "
                "use --method cat or svd")


def merge_pairs(parents: Sequence[LoraPairs], weights: Sequence[float], method: str, *, density: float | None = None,
                svd_rank: int | None = None, seed: int = 0, name: str = "merged") -> LoraPairs:
    """The merged adapter's factors (scaling folded into B, float32)."""
    check_parents(parents, method)
    if len(weights) != len(parents):
        raise ComposeError(f"{len(weights)} weights for {len(parents)} adapters")
    if method in DENSE_METHODS:
        density = DEFAULT_DENSITY if density is None else density
        if not 0 < density <= 1:
            raise ComposeError(f"--density must be in (0, 1], got {density}")
    elif density is not None:
        raise ComposeError(f"--density applies to {', '.join(DENSE_METHODS)}, not {method}")
    rank = svd_rank if svd_rank is not None else max(p.rank for p in parents)
    if method in ("svd", *DENSE_METHODS):
        if rank < 1:
            raise ComposeError(f"--svd-rank must be >= 1, got {svd_rank}")
    elif svd_rank is not None:
        raise ComposeError(f"--svd-rank applies to svd and {', '.join(DENSE_METHODS)}, not {method}")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    all_modules = sorted({m for p in parents for m in p.modules})
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # DARE's random drops (merge_utils draws from torch's global RNG)
    try:
        for module in all_modules:
            have = [(p.modules[module], w) for p, w in zip(parents, weights) if module in p.modules]
            modules[module] = _merge_module(have, method, density, rank)
    finally:
        torch.random.set_rng_state(gen_state)
    return LoraPairs(name, modules)


def _merge_module(have: list[tuple[tuple[torch.Tensor, torch.Tensor], float]], method: str, density: float | None,
                  rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    A = [a.float() for (a, _), _ in have]
    B = [b.float() for (_, b), _ in have]
    w = [float(x) for _, x in have]
    if method == "cat":
        return torch.cat(A, 0), torch.cat([b * wi for b, wi in zip(B, w)], 1)
    if method == "linear":
        # PEFT's linear: sqrt(|w|) on each side, the sign on A. Scaling sits on B here, which
        # equals PEFT's split when the parents share alpha/r.
        a = sum(math.copysign(math.sqrt(abs(wi)), wi) * ai for ai, wi in zip(A, w))
        b = sum(math.sqrt(abs(wi)) * bi for bi, wi in zip(B, w))
        return a, b
    if method == "svd":
        return _lowrank_svd(torch.cat([b * wi for b, wi in zip(B, w)], 1), torch.cat(A, 0), rank)
    merged = dense_merge([b @ a for a, b in zip(A, B)], w, method, density)
    return _top_factors(merged, rank)


def trim_by_magnitude(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-`density` magnitudes of each tensor in `stacked` ([n, ...]), zero the rest.

    PEFT's `magnitude_based_pruning` does this with `topk(k=density*numel)`, which dominated a
    4-adapter TIES merge of the embedded base (0.2 s per [1536, 576] update); the threshold
    from `kth_largest` is ~8x cheaper and gives the same mask, except that every entry tied
    with the threshold is kept where topk would pick among them arbitrarily."""
    flat = stacked.reshape(stacked.shape[0], -1)
    k = int(density * flat.shape[1])
    if k >= flat.shape[1]:
        return stacked
    if k <= 0:
        return torch.zeros_like(stacked)
    mag = flat.abs().float()
    threshold = torch.stack([kth_largest(row, k) for row in mag]).view(-1, 1)
    return (flat * (mag >= threshold)).reshape(stacked.shape)


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest of a 1-D float32 tensor of magnitudes, by a one-level radix select:
    non-negative floats order like their bit patterns, so a histogram of the top 16 bits finds
    the bucket holding the k-th largest, and `kthvalue` runs on that bucket alone (well under
    1% of the entries). 3x faster than `kthvalue` on all of them for a [1536, 576] update."""
    high = mag.view(torch.int32) >> 16
    at_or_above = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0).flip(0)  # [b]: entries in buckets >= b
    bucket = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[bucket + 1]) if bucket + 1 < at_or_above.numel() else 0
    vals = mag[high == bucket]
    return vals.kthvalue(vals.numel() - (k - above) + 1).values


def dense_merge(deltas: list[torch.Tensor], weights: Sequence[float], method: str, density: float) -> torch.Tensor:
    """TIES / DARE / magnitude_prune on dense updates, as PEFT's `merge_utils` defines them
    (its sign election, disjoint mean and random drop are used as they are; only the
    magnitude trim is ours, see `trim_by_magnitude`)."""
    from peft.utils import merge_utils

    stacked = torch.stack(deltas)
    if method in ("ties", "magnitude_prune"):
        stacked = trim_by_magnitude(stacked, density)
    else:  # dare_linear, dare_ties: drop with p = 1 - density, rescale the survivors
        stacked = merge_utils.prune(stacked, density, method="random", rescale=True)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("magnitude_prune", "dare_linear"):
        return weighted.sum(0)
    sign_mask = merge_utils.calculate_majority_sign_mask(stacked, method="total")  # elected on the unweighted trims, as PEFT
    return merge_utils.disjoint_merge(weighted, sign_mask)


OVERSAMPLE = 10  # extra random directions for svd_lowrank; with 4 power iterations the rank-16
# error is within 1e-6 of the exact truncated SVD on the embedded base's merged updates


def _top_factors(merged: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors `(A', B')` of a dense update. A trimmed update is full rank,
    so the low-rank QR trick of `_lowrank_svd` does not apply; a full SVD of every [1536, 576]
    update took 13 s of a merge, the randomized `svd_lowrank` (seeded by `merge_pairs`) ~1 s."""
    if min(merged.shape) <= 2 * (rank + OVERSAMPLE):
        U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
        r = min(rank, S.shape[0])
        return Vh[:r].contiguous(), (U[:, :r] * S[:r]).contiguous()
    U, S, V = torch.svd_lowrank(merged, q=rank + OVERSAMPLE, niter=4)
    return V[:, :rank].t().contiguous(), (U[:, :rank] * S[:rank]).contiguous()


def _lowrank_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors `(A', B')` of `b @ a` (b [out, k], a [k, in]) without forming it:
    `b = Qb Rb`, `a^T = Qa Ra`, SVD of the k x k core `Rb Ra^T`."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    r = min(rank, s.shape[0])
    return (vh[:r] @ qa.t()).contiguous(), ((qb @ u[:, :r]) * s[:r]).contiguous()


# ---------------------------------------------------------------- library level
def load_parents(library: "Library", names: Sequence[str]) -> tuple[list[Adapter], list[LoraPairs]]:
    """Open the named adapters (one-line NotFoundError for an unknown name) and check that
    they were made for one base."""
    adapters = [library.get(n) for n in names]
    fps = {a.card.base_fingerprint for a in adapters if a.card.base_fingerprint}
    if len(fps) > 1:
        by = {a.name: a.card.base_fingerprint for a in adapters}
        raise IncompatibleError(f"adapters were trained for different bases: {by}")
    return adapters, [library.pairs(a.name) for a in adapters]


def add_composed(library: "Library", pairs: LoraPairs, name: str, parents: Sequence[Adapter], composition: dict[str, Any],
                 description: str, *, overwrite: bool = False, examples: list[str] | None = None,
                 routable: bool = True) -> Adapter:
    """Write `pairs` as a PEFT directory and add it to the library atomically (Library.add):
    an error or an interrupt before the add leaves the library as it was."""
    library.check_new(name, overwrite, ComposeError)
    fp = next((a.card.base_fingerprint for a in parents if a.card.base_fingerprint), None)
    base_name = next((a.card.base_name for a in parents if a.card.base_name), "")
    if examples is None:
        examples = [t for a in parents for t in a.examples()[:EXAMPLES_PER_PARENT]]
    card = {
        "name": name, "description": description, "base_fingerprint": fp, "base_name": base_name,
        "rank": pairs.rank, "alpha": float(pairs.rank), "target_modules": pairs.targets, "composition": composition,
        "routable": routable,
    }
    with tempfile.TemporaryDirectory(prefix="lorastack-compose-") as tmp:
        write_peft_dir(Path(tmp), pairs, template=parents[0].config(), card=card)
        return library.add(Path(tmp), name, card_updates=card, examples=examples, overwrite=overwrite)


def merge(library: "Library", names: Sequence[str], name: str, *, method: str = "cat", weights: Sequence[float] | None = None,
          density: float | None = None, svd_rank: int | None = None, subtract: str | None = None, seed: int = 0,
          overwrite: bool = False, routable: bool = False) -> Adapter:
    """Merge library adapters `names` into a new library adapter `name` (the CLI's `compose merge`).

    Not routable unless `routable`: a merge stores its parents' examples and answers their
    requests too, so `auto` could no longer tell it from them (measured by a new-user trial: six
    merges of reverse_words and date_format sent a date request that went to date_format at
    0.9995 to the bare base at 0.39 against a 0.99 bar). It is used by name.

    With `subtract`, the named general adapter's update is removed from every parent first
    (GenKnowSub, see compose/subtract.py). The new card records parents, method, weights
    and options; nothing reaches the library unless the whole merge succeeds.
    """
    from .subtract import subtract_general

    if method not in METHODS:
        raise ComposeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if name in names:
        raise ComposeError(f"the new adapter cannot replace its own parent {name!r}")
    dup = next((n for n in names if list(names).count(n) > 1), None)
    if dup:
        raise ComposeError(f"adapter {dup!r} is named twice")
    adapters, pairs = load_parents(library, names)
    weights = list(weights) if weights is not None else default_weights(method, len(names))
    if len(weights) != len(names):
        raise ComposeError(f"{len(weights)} weights for {len(names)} adapters")
    general_adapter = None
    if subtract:
        if subtract in names:
            raise ComposeError(f"--subtract {subtract!r} is also a parent")
        (general_adapter,), (general,) = load_parents(library, [subtract])
        load_parents(library, [*names, subtract])  # one base for all
        pairs, weights = subtract_general(pairs, weights, general, method)
    merged = merge_pairs(pairs, weights, method, density=density, svd_rank=svd_rank, seed=seed, name=name)
    composition = {
        "kind": "merge", "method": method,
        "parents": [{"name": n, "weight": w} for n, w in zip(names, weights[: len(names)])],
        "density": density if method in DENSE_METHODS and density is not None else (DEFAULT_DENSITY if method in DENSE_METHODS else None),
        "svd_rank": merged.rank if method in ("svd", *DENSE_METHODS) else None,
        "seed": seed if method.startswith("dare") else None,
        "subtract": subtract,
    }
    desc = f"{method} merge of {', '.join(names)}" + (f" minus {subtract}" if subtract else "")
    return add_composed(library, merged, name, adapters + ([general_adapter] if general_adapter else []), composition,
                        desc, overwrite=overwrite, examples=[t for a in adapters for t in a.examples()[:EXAMPLES_PER_PARENT]],
                        routable=routable)
