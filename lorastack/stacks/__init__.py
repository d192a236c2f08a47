"""Stacks: pipelines of small experts that talk in natural language (see spec.py, run.py)."""

from .run import StackResult, StackRunner, StageTrace
from .spec import StackError, StackSpec, load_stack, parse_stack
from .store import StackStore

__all__ = ["StackError", "StackResult", "StackRunner", "StackSpec", "StackStore", "StageTrace", "load_stack", "parse_stack"]
