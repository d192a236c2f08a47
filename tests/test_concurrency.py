"""Several real processes on one library at once: importing, overwriting, training,
removing and opening (which sweeps) must all end correctly, and a killed training run
leaves nothing behind once the next run has started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lorastack.base import Base
from lorastack.library import Library
from test_library import make_peft_adapter

PRELUDE = """
import sys, json
from pathlib import Path
from lorastack.base import Base
from lorastack.library import Library
base_dir, lib_dir, src_dir = sys.argv[1:4]
"""

IMPORTER = PRELUDE + """
base = Base.load(base_dir)
tag = sys.argv[4]
for i in range(6):
    lib = Library(lib_dir)
    lib.import_dir(Path(src_dir) / f"s{i % 3}", f"{tag}{i}", base=base)
    lib.import_dir(Path(src_dir) / f"s{i % 3}", "shared", base=base, overwrite=True)
    if i % 2:
        lib.remove(f"{tag}{i}")
print("ok")
"""

OPENER = PRELUDE + """
for _ in range(40):
    lib = Library(lib_dir)   # opening sweeps leftovers and reconciles the index
    lib.names(); lib.list()
print("ok")
"""

TRAINER = PRELUDE + """
from lorastack.tasks import get_task
from lorastack.train import TrainConfig, train_to_library
base = Base.load(base_dir)
records = get_task("reverse_words").generate(24, "train", seed=0)
steps = int(sys.argv[5])
train_to_library(base, Library(lib_dir), records, sys.argv[4], TrainConfig(rank=2, alpha=4, steps=steps, batch_size=4,
                 eval_generate=0), progress=False)
print("ok")
"""


def spawn(script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_processes_importing_training_removing_and_opening_at_once(tiny_base_dir, tmp_path):
    base = Base.load(str(tiny_base_dir))
    src = tmp_path / "src"
    for i in range(3):
        make_peft_adapter(base, src / f"s{i}", seed=i)
    lib_dir = tmp_path / "lib"
    env = {**os.environ, "TMPDIR": str(tmp_path / "scratch")}
    (tmp_path / "scratch").mkdir()
    common = (tiny_base_dir, lib_dir, src)
    procs = [spawn(IMPORTER, *common, "p", env=env), spawn(IMPORTER, *common, "q", env=env),
             spawn(OPENER, *common, env=env), spawn(OPENER, *common, env=env),
             spawn(TRAINER, *common, "trained", 3, env=env)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and out.strip().endswith("ok"), err[-2000:]
    lib = Library(lib_dir)
    expected = sorted([f"{t}{i}" for t in "pq" for i in (0, 2, 4)] + ["shared", "trained"])
    assert lib.names() == expected
    assert sorted(p.name for p in lib.adapters_dir.iterdir()) == expected  # nothing half-written left
    assert lib.check(base) == []
    assert list((tmp_path / "scratch").iterdir()) == []  # training cleaned its scratch directory


def wait_for_scratch(proc: subprocess.Popen, scratch: Path) -> None:
    deadline = time.monotonic() + 300
    while not any(p.name.startswith("lorastack-train-") for p in scratch.iterdir()):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_killed_training_leaves_nothing_behind_after_the_next_run(tiny_base_dir, tmp_path):
    import lorastack.atomic as atomic

    lib_dir = tmp_path / "lib"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    victim = spawn(TRAINER, tiny_base_dir, lib_dir, tmp_path, "victim", 100000, env=env)
    wait_for_scratch(victim, scratch)
    time.sleep(1.0)  # let it write into its scratch directory
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    leftovers = [p for p in scratch.iterdir() if p.name.startswith("lorastack-train-")]
    assert leftovers, "SIGKILL skips cleanup; the next run must find and remove this"
    old = time.time() - 2 * atomic.STAGING_GRACE_S
    for p in leftovers:
        os.utime(p, (old, old))
    nxt = spawn(TRAINER, tiny_base_dir, lib_dir, tmp_path, "next", 2, env=env)
    out, err = nxt.communicate(timeout=600)
    assert nxt.returncode == 0, err[-2000:]
    assert list(scratch.iterdir()) == []
    lib = Library(lib_dir)
    assert lib.names() == ["next"]
    assert [p.name for p in lib.adapters_dir.iterdir()] == ["next"]
    assert json.loads((lib.adapters_dir / "next" / "card.json").read_text())["name"] == "next"
