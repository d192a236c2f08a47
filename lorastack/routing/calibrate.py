"""`lorastack router calibrate --data FILE`: move a router's abstention threshold to fit a user's own phrasings.

The built-in operating point is fitted on generic prompts the library knows nothing about;
a user knows what their requests look like. Given their labelled inputs (`adapter`: the
adapter that should answer, or null/"base" for requests that should reach the bare
base), the threshold that routes most of them right is saved next to the library
(`router-calibration.json`) and used by that router until the library's set of adapters
changes (a new adapter changes what "close enough" means, so the override then lapses and
the fitted operating point applies again).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import TMP_PREFIX
from ..data import prompt_text
from ..errors import LorastackError
from ..runtime import Runtime
from .calibration import CALIBRATION_FILE, fit_labelled

CALIBRATABLE = ("knn", "learned")


def _path(rt: Runtime) -> Path:
    return rt.library.root / CALIBRATION_FILE


def calibrate_on_data(rt: Runtime, router_name: str, data: Path) -> dict[str, Any]:
    if router_name not in CALIBRATABLE:
        raise LorastackError(f"router {router_name!r} has no calibrated threshold; use one of {', '.join(CALIBRATABLE)}")
    records = _read_inputs(data)
    served = set(rt.served())
    labels: list[str | None] = []
    for i, r in enumerate(records, 1):
        label = r.get("adapter", r.get("task"))
        label = None if label in (None, "", "base") else str(label)
        if label is not None and label not in served:
            raise LorastackError(f"{data}:{i}: adapter {label!r} is not in the library")
        labels.append(label)
    if not any(labels):
        raise LorastackError(f"{data}: no input names an adapter; label some with \"adapter\": NAME")
    router = rt.router(router_name)
    router.override = None
    decisions = router.route([prompt_text(r) for r in records])
    margin = np.array([d.confidence if d.confidence is not None else -np.inf for d in decisions], dtype=np.float64)
    correct = np.array([d.candidate == lab for d, lab in zip(decisions, labels)])
    should = np.array([lab is not None for lab in labels])
    before_t = router.threshold()
    names = router.routable()
    # The learned gate lowers the shared threshold per adapter; the calibrated one replaces them
    # all, so the report shows what each adapter had to reach before, not just the shared figure.
    per_adapter = {n: float(router.threshold(adapter=i)) for i, n in enumerate(names)} if router_name == "learned" else {}
    routed = np.array([not d.abstained for d in decisions])  # the fitted thresholds (per adapter, for the gate)
    before = float(np.mean(np.where(routed, should & correct, ~should)))
    threshold, acc = fit_labelled(margin, correct, should)
    path = _path(rt)
    stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    stored[router_name] = {"threshold": threshold, "base": rt.base.fingerprint, "adapters": sorted(names),
                           "data": str(data), "n": len(records), "accuracy": acc}
    tmp = path.with_name(TMP_PREFIX + CALIBRATION_FILE)
    tmp.write_text(json.dumps(stored, indent=2), encoding="utf-8")
    tmp.replace(path)
    router.override = threshold
    return {"router": router_name, "n": len(records), "threshold_before": before_t, "threshold": threshold,
            "thresholds_before": per_adapter, "accuracy_before": before, "accuracy": acc, "path": str(path)}


def _read_inputs(path: Path) -> list[dict[str, Any]]:
    """JSONL inputs with a `prompt` (or `messages`) and a label; no completion needed."""
    if not path.is_file():
        raise LorastackError(f"{path}: no such file")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorastackError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not (isinstance(rec.get("prompt"), str) or isinstance(rec.get("messages"), list)):
            raise LorastackError(f"{path}:{i}: needs a 'prompt' string or a 'messages' list")
        out.append(rec)
    if not out:
        raise LorastackError(f"{path}: no inputs")
    return out
