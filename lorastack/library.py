"""The Library: adapter directories plus an SQLite index, with atomic add and remove.

Layout: `<root>/adapters/<name>/` holds the PEFT files, `card.json` and `examples.jsonl`;
`<root>/index.sqlite` indexes them for listing and search. The directories are the truth
and the index is derived: opening a library sweeps leftovers of interrupted writes and
reconciles the index with what is on disk, so a crash at any point is harmless.

Every write builds a complete directory under a temporary name in the same parent and
publishes it with one `rename`, so readers see the old adapter or the new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import (
    CARD_FILE,
    CONFIG_FILE,
    EXAMPLES_FILE,
    PLOT_FILE,
    WEIGHTS_FILE,
    Adapter,
    AdapterCard,
    AdapterError,
    LoraPairs,
    check_card_values,
    check_compatible,
    check_finite,
    examples_jsonl,
    read_json,
    read_lora_pairs,
    read_while_replaced,
    weights_path,
)
from pydantic import ValidationError
from .atomic import READ_ATTEMPTS, TMP_PREFIX, dir_identity, locked, publish_dir, staging_dir, sweep_tmp, write_text_atomic
from .data import check_text
from .errors import LorastackError, NotFoundError, unknown_name_message
from .names import validate_name
from .paths import default_library_dir

if TYPE_CHECKING:
    import torch

    from .base import Base

INDEX_FILE = "index.sqlite"
LOCK_FILE = ".lock"

# Schema migrations, applied in order; PRAGMA user_version records how many have run.
MIGRATIONS: list[str] = [
    # v1: one row per adapter, with the card for listing without opening every directory.
    """
    CREATE TABLE adapters (
        name TEXT PRIMARY KEY,
        base_fingerprint TEXT,
        rank INTEGER,
        description TEXT,
        created_at TEXT,
        card TEXT NOT NULL
    );
    """,
    # v2: routing signatures (embeddings, prototypes) per adapter and kind, stored as blobs
    # so that routers can load the whole library's signatures with one query.
    """
    CREATE TABLE signatures (
        adapter TEXT NOT NULL REFERENCES adapters(name) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        data BLOB NOT NULL,
        PRIMARY KEY (adapter, kind)
    );
    CREATE INDEX adapters_by_base ON adapters(base_fingerprint);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


# Routing examples an adapter may hold (training stores 64) and the length of one: more
# would slow every refit of the routers and could not fit the examples file's read cap.
MAX_STORED_EXAMPLES = 2000
MAX_EXAMPLE_CHARS = 4000
SNAPSHOT_LIMITS = {WEIGHTS_FILE: 4 << 30, EXAMPLES_FILE: 16 << 20}  # other files: 1 MiB


def snapshot_files(src: Path, dest: Path, files: tuple[str, ...], roots: tuple[Path, ...] | None) -> None:
    """Copy `files` of `src` that exist into `dest`, each through one descriptor: opened
    without blocking (a FIFO is refused, not waited on), a regular file, at most its size
    limit and, with `roots`, resolving (as opened, symlinks followed) inside one of them."""
    import stat

    for f in files:
        p = src / f
        if not p.exists() and not p.is_symlink():
            if f in (CONFIG_FILE, WEIGHTS_FILE):
                raise AdapterError(f"{src.name}: missing {f}")
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise AdapterError(f"{f}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AdapterError(f"{f} is not a regular file")
            limit = SNAPSHOT_LIMITS.get(f, 1 << 20)
            if st.st_size > limit:
                raise AdapterError(f"{f} is {st.st_size} bytes; at most {limit} are accepted")
            if roots is not None:
                real = Path(os.path.realpath(f"/proc/self/fd/{fd}")) if Path("/proc/self/fd").is_dir() else p.resolve()
                if not any(real == r or r in real.parents for r in roots):
                    raise PermissionError(f"{f} in the import directory points outside the server's import roots")
            os.set_blocking(fd, True)
            with os.fdopen(os.dup(fd), "rb") as fh, open(dest / f, "wb") as out:
                copied = 0
                while chunk := fh.read(1 << 20):
                    copied += len(chunk)
                    if copied > limit:
                        raise AdapterError(f"{f} grew past {limit} bytes while being read")
                    out.write(chunk)
        finally:
            os.close(fd)


class Library:
    """A directory of adapters; safe against crashes and concurrent readers."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_library_dir()
        self.adapters_dir = self.root / "adapters"
        self._lock = threading.RLock()
        try:
            self.adapters_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LorastackError(f"cannot create library at {self.root}: {e.strerror}") from None
        with self._writing():  # two processes opening a new library must not both migrate it
            self._migrate()
            self._reconcile()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One writer at a time, across threads and processes: stage, check, publish and
        index happen as one step (a long training run holds nothing, only its final add)."""
        with self._lock, locked(self.root / LOCK_FILE):
            yield

    # ------------------------------------------------------------ index
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock, closing(sqlite3.connect(self.root / INDEX_FILE, timeout=30)) as con:
            con.execute("PRAGMA foreign_keys = ON")
            with con:  # one transaction: commit on success, roll back on any error
                yield con

    def schema_version(self) -> int:
        with self._db() as con:
            return int(con.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._db() as con:
            version = int(con.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise LorastackError(
                    f"library {self.root} has schema v{version}, newer than this lorastack (v{SCHEMA_VERSION}); upgrade lorastack"
                )
            for v in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                con.execute(f"PRAGMA user_version = {v + 1}")

    def _index(self, con: sqlite3.Connection, adapter: Adapter) -> None:
        c = adapter.card
        con.execute(
            "INSERT OR REPLACE INTO adapters(name, base_fingerprint, rank, description, created_at, card) VALUES (?,?,?,?,?,?)",
            (c.name, c.base_fingerprint, c.rank, c.description, c.created_at, c.model_dump_json()),
        )

    def reconcile(self) -> dict[str, list[str]]:
        """Sweep interrupted writes (of processes that are gone) and make the index match the
        directories on disk."""
        with self._writing():
            return self._reconcile()

    def _reconcile(self) -> dict[str, list[str]]:
        swept = [p.name for p in sweep_tmp(self.adapters_dir)]
        on_disk: dict[str, Adapter] = {}
        for d in sorted(self.adapters_dir.iterdir()):
            if d.is_dir() and not d.name.startswith(TMP_PREFIX):
                try:
                    on_disk[d.name] = Adapter.open(d)
                except LorastackError:
                    continue  # not an adapter; `check()` reports it
        with self._db() as con:
            indexed = {r[0]: r[1] for r in con.execute("SELECT name, card FROM adapters")}
            stale = [n for n in indexed if n not in on_disk]
            for n in stale:
                con.execute("DELETE FROM adapters WHERE name = ?", (n,))
            added = []
            for n, a in on_disk.items():
                if indexed.get(n) != a.card.model_dump_json():
                    self._index(con, a)
                    added.append(n)
        return {"swept": swept, "dropped": stale, "indexed": added}

    # ------------------------------------------------------------ reading
    def names(self) -> list[str]:
        with self._db() as con:
            return [r[0] for r in con.execute("SELECT name FROM adapters ORDER BY name")]

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def get(self, name: str) -> Adapter:
        path = self._path(name)
        for attempt in range(READ_ATTEMPTS):
            before = dir_identity(path) if path.is_dir() else None
            if before is None:
                raise NotFoundError(unknown_name_message("adapter", name, self.names()))
            try:
                return Adapter.open(path)
            except AdapterError:
                after = dir_identity(path)
                if after is None:  # removed by another thread or process while we opened it
                    raise NotFoundError(unknown_name_message("adapter", name, self.names())) from None
                if after != before and attempt + 1 < READ_ATTEMPTS:
                    continue  # replaced meanwhile: read the new one
                raise
        raise AssertionError("unreachable")

    def pairs(self, name: str, dtype: "torch.dtype | None" = None) -> LoraPairs:
        """Adapter `name`'s LoRA pairs, read again on the new copy if it is replaced while
        read (a concurrent import with overwrite) and NotFoundError if it is removed meanwhile."""
        return read_while_replaced(lambda: self.get(name), lambda a: read_lora_pairs(a, dtype),
                                   lambda: NotFoundError(unknown_name_message("adapter", name, self.names())))

    def list(self) -> list[Adapter]:
        with self._db() as con:
            rows = con.execute("SELECT name, card FROM adapters ORDER BY name").fetchall()
        return [Adapter(self.adapters_dir / n, AdapterCard.model_validate_json(card)) for n, card in rows]

    def search(self, text: str) -> list[Adapter]:
        """Adapters whose name or description contains `text` (case-insensitive)."""
        escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")  # literal text, not LIKE wildcards
        needle = f"%{escaped}%"
        with self._db() as con:
            rows = con.execute(
                "SELECT name, card FROM adapters WHERE lower(name) LIKE ? ESCAPE '\\' OR lower(description) LIKE ? ESCAPE '\\' "
                "ORDER BY name",
                (needle, needle),
            ).fetchall()
        return [Adapter(self.adapters_dir / n, AdapterCard.model_validate_json(card)) for n, card in rows]

    def _path(self, name: str) -> Path:
        return self.adapters_dir / validate_name(name)

    # ------------------------------------------------------------ writing
    def add(
        self,
        src: str | Path,
        name: str,
        *,
        base: "Base | None" = None,
        card_updates: dict[str, Any] | None = None,
        examples: list[str] | None = None,
        overwrite: bool = False,
    ) -> Adapter:
        """Copy the PEFT adapter in `src` into the library as `name`, atomically.

        With `base`, the adapter is checked against it first (shapes and fingerprint) and
        the card records that base. Nothing under `name` changes unless everything succeeds.
        """
        validate_name(name)
        src = Path(src)
        final = self._path(name)
        if final.exists() and not overwrite:
            raise self._exists(name)
        source = Adapter.open(src, name=name)
        card = source.card.model_dump()
        card.update(card_updates or {})
        card["name"] = name
        if base is not None:
            card["base_name"] = card.get("base_name") or base.name
        try:
            card_obj = AdapterCard.model_validate(card)
        except ValidationError as e:
            first = e.errors()[0]
            raise AdapterError(f"{name}: invalid card field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        texts = examples if examples is not None else source.examples()
        with self._writing(), staging_dir(self.adapters_dir) as tmp:
            if final.exists() and not overwrite:  # added by another process meanwhile
                raise self._exists(name)
            # Checks run on the staged copy, which is exactly what gets published (a source
            # changed after the check cannot slip in); errors name the adapter, not the folder.
            for f in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(src / f, tmp / f)
            if (src / PLOT_FILE).is_file() and not (src / PLOT_FILE).is_symlink():
                shutil.copyfile(src / PLOT_FILE, tmp / PLOT_FILE)
            if base is not None:
                check_compatible(tmp, base, card.get("base_fingerprint"), label=name, values=True)
                card_obj.base_fingerprint = base.fingerprint
            else:  # no base to check shapes against; the values are checked all the same
                check_finite(tmp, name)
            (tmp / CARD_FILE).write_text(card_obj.model_dump_json(indent=2), encoding="utf-8")
            if texts:
                (tmp / EXAMPLES_FILE).write_text(examples_jsonl(texts), encoding="utf-8")
            Adapter.open(tmp).weights()  # the copy must be readable before it is published
            publish_dir(tmp, final, replace=overwrite)
            adapter = Adapter(final, card_obj)
            with self._db() as con:
                con.execute("DELETE FROM signatures WHERE adapter = ?", (name,))
                self._index(con, adapter)
        return adapter

    @staticmethod
    def _exists(name: str, error: type[LorastackError] = LorastackError) -> LorastackError:
        return error(f"adapter {name!r} already exists in the library; use --force to replace it")

    def check_new(self, name: str, overwrite: bool = False, error: type[LorastackError] = LorastackError) -> None:
        """Refuse a bad name, or one already in the library unless `overwrite`, before any
        work: a typo or a forgotten --force costs seconds, not a training run or a search.
        `add` checks again when it publishes (another process may add the name meanwhile)."""
        validate_name(name)
        if not overwrite and name in self.names():
            raise self._exists(name, error)

    def import_dir(self, src: str | Path, name: str | None = None, *, base: "Base", overwrite: bool = False,
                   roots: tuple[Path, ...] | None = None) -> Adapter:
        """Import a PEFT LoRA trained elsewhere; refuses one that does not fit `base`.

        With `roots` (the server's import roots), every file that will be read must resolve
        inside one of them, so a symlinked weights file cannot pull in data from elsewhere.
        """
        src = Path(src).expanduser()
        if not src.is_dir():
            raise AdapterError(f"{src}: not a directory (expected a PEFT LoRA directory)")
        if name is not None:
            validate_name(name)
        if not (src / CONFIG_FILE).exists():
            raise AdapterError(f"{src.name}: missing {CONFIG_FILE} (PEFT adapter config)")
        weights_path(src)  # a missing or pickle-only weights file is named before anything is read
        # Everything is read once, through descriptors checked as they are opened, into a
        # private snapshot; the checks and the copy into the library then see only that, so
        # files swapped for symlinks (or FIFOs) after a check cannot slip in or hang us.
        with staging_dir(self.adapters_dir) as snap:
            snapshot_files(src, snap, (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, EXAMPLES_FILE), roots)
            if name is None:
                card_path = snap / CARD_FILE
                card_name = read_json(card_path, "adapter card").get("name") if card_path.exists() else None
                name = card_name if isinstance(card_name, str) else src.resolve().name
            return self.add(snap, name, base=base, overwrite=overwrite)

    def update_card(self, name: str, **fields: Any) -> Adapter:
        """Change card fields (description, metrics, ...) atomically."""
        with self._writing():
            adapter = self.get(name)
            try:
                card = AdapterCard.model_validate({**adapter.card.model_dump(), **fields, "name": name})
            except ValidationError as e:
                first = e.errors()[0]
                raise LorastackError(f"{name}: invalid card field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
            check_card_values(card.model_dump(), f"{name}: card")  # what `open` would refuse must not be written
            adapter.card = card
            adapter.write_card()
            with self._db() as con:
                self._index(con, adapter)
        return adapter

    def add_examples(self, name: str, texts: list[str]) -> tuple[int, int]:
        """Add requests to the routing examples stored with adapter `name` (its weights do not
        change); returns (added, now stored). Why: a router only knows an adapter through these
        examples, and one trained on a wording or two can miss requests worded the user's way,
        which a few of them, shown here, teach it without retraining. Texts already stored are
        skipped; the file is replaced atomically and the adapter's routing signatures are
        dropped, so every router recomputes them (and the learned gate refits) on next use."""
        clean = []
        for i, t in enumerate(texts, start=1):
            t = t.strip()
            if not t:
                raise LorastackError(f"example {i} is empty")
            if len(t) > MAX_EXAMPLE_CHARS:
                raise LorastackError(f"example {i} is {len(t)} characters; at most {MAX_EXAMPLE_CHARS}")
            clean.append(check_text(t, f"example {i}"))  # what the routers' tokenizers could not encode
        with self._writing():
            adapter = self.get(name)
            have = adapter.examples()
            seen = set(have)
            new = [t for t in dict.fromkeys(clean) if t not in seen]
            if len(have) + len(new) > MAX_STORED_EXAMPLES:
                raise LorastackError(f"{name}: {len(have)} stored examples + {len(new)} new would exceed {MAX_STORED_EXAMPLES}")
            if new:
                write_text_atomic(adapter.path / EXAMPLES_FILE, examples_jsonl(have + new))
                with self._db() as con:
                    con.execute("DELETE FROM signatures WHERE adapter = ?", (name,))
        return len(new), len(have) + len(new)

    def examples_stamp(self, names: list[str]) -> str:
        """A cheap fingerprint of these adapters' stored examples (each file's size, mtime and
        inode: a stat, no read), so a router fitted on them can tell when they changed."""
        parts = []
        for name in names:
            try:
                st = (self._path(name) / EXAMPLES_FILE).stat()
                parts.append([name, st.st_size, st.st_mtime_ns, st.st_ino])
            except OSError:
                parts.append([name, None])
        return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]

    def remove(self, name: str) -> None:
        """Delete an adapter: renamed aside first, so a crash leaves it either whole or gone."""
        path = self._path(name)
        with self._writing():
            if not path.is_dir():  # also when another process removed it a moment ago
                raise NotFoundError(unknown_name_message("adapter", name, self.names()))
            doomed = path.with_name(f"{TMP_PREFIX}rm-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            path.rename(doomed)
            with self._db() as con:
                con.execute("DELETE FROM signatures WHERE adapter = ?", (name,))
                con.execute("DELETE FROM adapters WHERE name = ?", (name,))
        shutil.rmtree(doomed, ignore_errors=True)

    def export(self, name: str, dest: str | Path) -> Path:
        """Copy an adapter out as a plain PEFT directory (card included) at `dest`."""
        adapter = self.get(name)
        dest = Path(dest).expanduser()
        if dest.exists() and any(dest.iterdir()) if dest.is_dir() else dest.exists():
            raise LorastackError(f"{dest} already exists and is not empty")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with staging_dir(dest.parent) as tmp:
            for f in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, EXAMPLES_FILE, PLOT_FILE):
                if (adapter.path / f).exists():
                    shutil.copy2(adapter.path / f, tmp / f)
            if dest.is_dir():
                dest.rmdir()
            publish_dir(tmp, dest)
        return dest

    # ------------------------------------------------------------ signatures (routing)
    def put_signature(self, name: str, kind: str, data: bytes, meta: dict[str, Any] | None = None) -> None:
        try:
            with self._db() as con:
                con.execute(
                    "INSERT OR REPLACE INTO signatures(adapter, kind, meta, data) VALUES (?,?,?,?)",
                    (name, kind, json.dumps(meta or {}), data),
                )
        except sqlite3.IntegrityError:  # the adapter was removed while its signature was computed
            raise NotFoundError(unknown_name_message("adapter", name, self.names())) from None

    def signatures(self, kind: str) -> dict[str, tuple[dict[str, Any], bytes]]:
        with self._db() as con:
            rows = con.execute("SELECT adapter, meta, data FROM signatures WHERE kind = ?", (kind,)).fetchall()
        return {a: (json.loads(m), d) for a, m, d in rows}

    # ------------------------------------------------------------ health
    def check(self, base: "Base | None" = None) -> list[str]:
        """Problems found (unreadable directories, adapters that do not fit `base`)."""
        problems = []
        for d in sorted(self.adapters_dir.iterdir()):
            if not d.is_dir() or d.name.startswith(TMP_PREFIX):
                continue
            try:
                a = Adapter.open(d)
                if base is not None:
                    a.check_compatible(base)
            except LorastackError as e:
                problems.append(f"{d.name}: {e}")
        return problems
