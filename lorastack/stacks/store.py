"""Stacks kept in the library: `<library>/stacks/<name>.yaml`, served as `stack/<name>`.

A stack is a small text file, so it is written with one atomic replace; its adapters are
checked against the library when it is added and again each time it runs (an adapter
removed later makes that run fail with a clear error, not the store).
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import LorastackError, NotFoundError, unknown_name_message
from ..names import validate_name
from ..route import Route, parse_spec
from .spec import StackSpec, dump_stack, load_stack

STACKS_DIR = "stacks"


class StackStore:
    def __init__(self, library_root: Path) -> None:
        self.dir = Path(library_root) / STACKS_DIR

    def _path(self, name: str) -> Path:
        return self.dir / f"{validate_name(name)}.yaml"

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.yaml") if not p.name.startswith("."))

    def get(self, name: str) -> StackSpec:
        path = self._path(name)
        if not path.is_file():
            raise NotFoundError(unknown_name_message("stack", name, self.names()))
        return load_stack(path)

    def using(self, adapter: str) -> list[str]:
        """The stored stacks with a stage whose model names `adapter` (alone or in a mixture):
        removing it breaks them only when they run, so `adapters rm` names them."""
        users = []
        for name in self.names():
            try:
                routes = [parse_spec(m) for m in self.get(name).models()]
            except LorastackError:  # a stack this version cannot read is not ours to judge
                continue
            if any(isinstance(r, Route) and adapter in r.names for r in routes):
                users.append(name)
        return users

    def add(self, spec: StackSpec, overwrite: bool = False) -> Path:
        path = self._path(spec.name)
        if path.exists() and not overwrite:
            from ..errors import LorastackError

            raise LorastackError(f"stack {spec.name!r} already exists; use --force to replace it")
        write_text_atomic(path, dump_stack(spec))
        return path

    def remove(self, name: str) -> None:
        path = self._path(name)
        if not path.is_file():
            raise NotFoundError(unknown_name_message("stack", name, self.names()))
        path.unlink()
