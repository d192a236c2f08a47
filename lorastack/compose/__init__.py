"""Composition: new adapters from library adapters without new training.

`merge` (linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune), `fewshot`
(LoraHub-style weight search on a few examples) and GenKnowSub's `--subtract` of a
general adapter. Sits above the engine and library; nothing below imports it.
"""

from .fewshot import FewshotResult, fewshot, fewshot_search, read_fewshot
from .merge import METHODS, ComposeError, merge, merge_pairs, parse_weights
from .subtract import minus, subtract_general

__all__ = ["METHODS", "ComposeError", "FewshotResult", "fewshot", "fewshot_search", "merge", "merge_pairs", "minus",
           "parse_weights", "read_fewshot", "subtract_general"]
