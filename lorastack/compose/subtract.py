"""GenKnowSub: subtract a general-knowledge adapter from task adapters before composing.

Task LoRAs trained on the same base share a "general" component (format, chat habits,
fluency) next to their task-specific one; averaging several of them adds that component
several times over. GenKnowSub trains one adapter on general data and subtracts its
update from each task adapter, so composition combines task skills only.

Where the general adapter comes from is the user's choice: any library adapter can be
named (`--subtract NAME`); `lorastack compose general` makes one offline by
self-distillation (generic prompts answered by the base itself, see general.py). Subtraction is exact: `T - G` is the LoRA with stacked factors
`[A_T; A_G]`, `[B_T, -B_G]` (rank r_T + r_G).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapter import LoraPairs


def minus(task: LoraPairs, general: LoraPairs, weight: float = 1.0) -> LoraPairs:
    """`task - weight * general` as stacked factors (exact; modules of either)."""
    modules = {}
    for module in sorted(set(task.modules) | set(general.modules)):
        a_parts, b_parts = [], []
        if module in task.modules:
            a, b = task.modules[module]
            a_parts.append(a.float())
            b_parts.append(b.float())
        if module in general.modules:
            a, b = general.modules[module]
            a_parts.append(a.float())
            b_parts.append(-weight * b.float())
        modules[module] = (torch.cat(a_parts, 0), torch.cat(b_parts, 1))
    return LoraPairs(f"{task.name}-{general.name}", modules)


def subtract_general(parents: Sequence[LoraPairs], weights: Sequence[float], general: LoraPairs,
                     method: str) -> tuple[list[LoraPairs], list[float]]:
    """Parents and weights to merge so that each parent has `general` subtracted.

    For the linear-in-updates methods (cat, svd) `sum_i w_i (T_i - G)` is
    `sum_i w_i T_i - (sum_i w_i) G`: the general adapter is appended once with weight
    `-sum(w)` instead of stacking it into every parent. The element-wise methods (ties,
    dare, magnitude_prune, linear) must see each `T_i - G` itself, as in the paper.
    """
    if method in ("cat", "svd"):
        return [*parents, general], [*weights, -float(sum(weights))]
    return [minus(p, general) for p in parents], list(weights)
