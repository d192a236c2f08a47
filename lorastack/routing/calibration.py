"""Abstention calibrated on negatives: when is an input close enough to an expert's job?

Similarity to an adapter's own examples alone cannot say that: a paraphrase is further
from the stored examples than they are from each other, yet much further from anything
generic. So the routers score an input by a *margin* — how much closer it is to the
winning adapter's examples than to the nearest generic chat request (the fixed set in
`lorastack.tasks.generic`, no user data) — and route only when the margin reaches a
threshold fitted on negatives:

- generic calibration prompts (each compared leave-one-out, so it is not its own
  nearest generic neighbour), and
- other adapters' stored examples that the router would send to the wrong adapter.

The operating point is a target *false-route rate*: the share of negatives allowed
through. `threshold(rate)` is the lowest margin that lets at most that share pass, so a
user can move the point per request without refitting anything. `fit_labelled` moves it to
fit a user's own labelled phrasings instead (`lorastack router calibrate --data FILE`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_FALSE_ROUTE = 0.01  # share of generic / wrong-task negatives allowed to reach an adapter
CALIBRATION_FILE = "router-calibration.json"  # user-fitted thresholds (lorastack router calibrate)


@dataclass
class Calibration:
    """Margins of the negatives that would be false routes (sorted, descending), out of `n_neg`."""

    false_margins: np.ndarray
    n_neg: int
    positive_margins: np.ndarray = field(default_factory=lambda: np.zeros(0))  # own examples, leave-one-out
    false_owners: np.ndarray | None = None  # the adapter each false margin would reach, when known

    @classmethod
    def fit(cls, neg_margins: np.ndarray, neg_wrong: np.ndarray, positive_margins: np.ndarray | None = None,
            neg_owners: np.ndarray | None = None) -> "Calibration":
        """`neg_margins[i]` is negative i's margin for the adapter it would be routed to
        (`neg_owners[i]`, when given); `neg_wrong[i]` whether that route would be wrong
        (always, for generic prompts)."""
        wrong = np.asarray(neg_wrong, dtype=bool)
        margins_ = np.asarray(neg_margins, dtype=np.float64)[wrong]
        order = np.argsort(-margins_, kind="stable")
        pos = np.asarray(positive_margins if positive_margins is not None else [], dtype=np.float64)
        owners = np.asarray(neg_owners, dtype=np.int64)[wrong][order] if neg_owners is not None else None
        return cls(margins_[order], int(len(neg_margins)), pos, owners)

    def for_adapter(self, adapter: int) -> "Calibration":
        """The negatives that would reach `adapter`, as a calibration of their own (at rate r it
        lets through at most r of *those*); the whole calibration when it does not know whose
        each negative is, or when some negatives are not false routes."""
        if self.false_owners is None or len(self.false_margins) != self.n_neg:
            return self
        mine = self.false_owners == adapter
        return Calibration(self.false_margins[mine], int(mine.sum()), self.positive_margins, self.false_owners[mine])

    def adapter_threshold(self, adapter: int, false_route: float = DEFAULT_FALSE_ROUTE) -> float:
        """The shared threshold, lowered to `adapter`'s own when the negatives that would reach
        it sit lower: a pair of easily confused adapters no longer sets the bar for a third
        whose negatives all stay far below it. Never higher than the shared one (an adapter
        reached by few negatives has too few to fit a stricter bar on), and at most twice the
        shared budget of negatives gets through: those above the shared bar, plus at most r
        of each adapter's own below it."""
        return min(self.threshold(false_route), self.for_adapter(adapter).threshold(false_route))

    def threshold(self, false_route: float = DEFAULT_FALSE_ROUTE) -> float:
        """The lowest margin at which at most `false_route` of the negatives are routed."""
        if not 0.0 <= false_route <= 1.0:
            from ..errors import LorastackError

            raise LorastackError(f"false_route must be between 0 and 1, got {false_route}")
        allowed = math.floor(false_route * self.n_neg + 1e-9)
        if allowed >= len(self.false_margins):
            return float(self.false_margins[-1]) if len(self.false_margins) else -1.0
        return float(np.nextafter(self.false_margins[allowed], np.inf))

    def positive_rate(self, threshold: float) -> float | None:
        """Share of the adapters' own (leave-one-out) examples that pass `threshold`."""
        return float((self.positive_margins >= threshold).mean()) if len(self.positive_margins) else None


def margins(sims: np.ndarray, owners: np.ndarray, n_adapters: int, generic_sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: each adapter's best similarity and the best similarity to a generic prompt.

    `sims [q, m]` against the stored examples (owner `owners[m]`), `generic_sims [q, g]`.
    Adapters without examples get -inf.
    """
    per = np.full((sims.shape[0], n_adapters), -np.inf)
    for a in range(n_adapters):
        cols = owners == a
        if cols.any():
            per[:, a] = sims[:, cols].max(1)
    generic = np.maximum(generic_sims.max(1), -1.0) if generic_sims.shape[1] else np.full(sims.shape[0], -1.0)
    return per, generic


def fit_labelled(margin: np.ndarray, correct: np.ndarray, should_route: np.ndarray) -> tuple[float, float]:
    """The threshold that gets most of a user's labelled inputs right, and that accuracy.

    `margin[i]` is input i's margin for the adapter the router picks, `correct[i]` whether
    that pick is its label, `should_route[i]` whether it has an adapter label at all (False:
    it should go to the base). Routing i is right iff should_route and correct; abstaining
    is right iff not should_route. Ties go to the higher (safer) threshold.
    """
    candidates = np.unique(np.concatenate([margin, [np.inf]]))
    best_t, best_acc = float("inf"), -1.0
    for t in candidates[::-1]:
        routed = margin >= t
        acc = float(np.mean(np.where(routed, should_route & correct, ~should_route)))
        if acc > best_acc + 1e-12:
            best_t, best_acc = float(t), acc
    return best_t, best_acc


def load_override(library_root: Path, router: str, fingerprint: str, names: list[str]) -> float | None:
    """The user-fitted threshold of `router`, if it was fitted for this base and these adapters."""
    path = library_root / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get(router)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not entry or entry.get("base") != fingerprint or entry.get("adapters") != sorted(names):
        return None
    return float(entry["threshold"])


# Two adapters whose stored examples are routed to each other at least this often, each way, do
# one job as far as their examples show (a retrained "v2", a copy trained on a subset): sending
# one's request to the other is not a false route. Measured with a subset-trained copy of
# json_field next to the 4 demo adapters (README, Routing: twins): counted as false routes, their
# mutual confusion raised kNN's shared threshold above every margin (5% / 0% top-1), and the
# learned gate split its probability between them (json_field's inputs all went to the base).
TWIN_CONFUSION = 0.25


def twins(owners: np.ndarray, routed: np.ndarray, n_adapters: int) -> np.ndarray:
    """[a, b]: whether adapters a and b are twins, from where examples of `owners` were routed."""
    counts = np.zeros((n_adapters, n_adapters))
    np.add.at(counts, (owners, routed), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    twin = (share >= TWIN_CONFUSION) & (share.T >= TWIN_CONFUSION)
    np.fill_diagonal(twin, False)
    return twin
