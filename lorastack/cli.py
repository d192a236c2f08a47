"""The `lorastack` command line: a thin layer over the Python API (no logic of its own).

User errors print one line (`error: ...`) and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

# Library deprecation chatter (transformers/PEFT) is not the user's problem.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import click  # noqa: E402
import typer  # noqa: E402
import typer.core  # noqa: E402

from .errors import LorastackError  # noqa: E402

if TYPE_CHECKING:  # the runtime (torch and all) loads only when a command needs it
    from .runtime import Runtime


def _flags_without_value_types() -> None:
    """typer's rich help prints a value type after every option, flags too (`--force <bool>`),
    which reads as if the flag took a value. A flag takes none: show nothing there.
    (Click's plain help already omits it; this aligns the rich one.)"""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "_flag_aware", False):
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        return None if getattr(self, "is_flag", False) or getattr(self, "count", False) else shown(self, ctx)

    display_type_rich._flag_aware = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_flags_without_value_types()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, route and serve a library of LoRA experts on one small base model.")
adapters_app = typer.Typer(no_args_is_help=True, help="Manage the adapter library.")
tasks_app = typer.Typer(no_args_is_help=True, help="Built-in tasks: seeded data generators with scorers.")
base_app = typer.Typer(no_args_is_help=True, help="The frozen base model.")
app.add_typer(adapters_app, name="adapters")
app.add_typer(tasks_app, name="tasks")
app.add_typer(base_app, name="base")


class Opts:
    base: str = "embedded"
    library: Optional[Path] = None
    dtype: Optional[str] = None
    debug: bool = False
    int8: bool = False


OPTS = Opts()


@app.callback()
def _global(
    base: str = typer.Option(os.environ.get("LORASTACK_BASE", "embedded"), "--base", help="'embedded', a Hugging Face model dir, or a .gguf file."),
    library: Optional[Path] = typer.Option(None, "--library", help="Library directory (default: $LORASTACK_HOME/library)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or bfloat16 (default bfloat16; training always keeps float32 weights)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    int8: bool = typer.Option(False, "--int8", help="int8 arithmetic where it is faster (bf16 only; outputs change slightly): "
                              "every matmul with the compiled kernels (1.2-1.4x at batch 1, 1.4-1.7x at 4-64 rows), "
                              "weight-only decode of <= 4 rows without them."),
) -> None:
    OPTS.base, OPTS.library, OPTS.dtype, OPTS.debug, OPTS.int8 = base, library, dtype, debug, int8


JSON_HELP = "Print the result as JSON (for scripts) instead of text."


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _library():
    from .library import Library

    return Library(OPTS.library)


def _int8() -> dict[str, Any]:
    """What `--int8` turns on: with the compiled kernels, int8 matmuls (aten's weight-only
    int8 GEMV is slower than those kernels at 1-4 rows: README, "--int8"); without them, that GEMV."""
    if not OPTS.int8:
        return {}
    from .engine.native import kernels

    return {"int8_matmuls": True} if kernels() is not None else {"int8_rows": 4}


def _runtime(dtype: Optional[str] = None):
    from .runtime import Runtime

    rt = Runtime.open(OPTS.base, OPTS.library, dtype=dtype or OPTS.dtype, **_int8())
    # Runtime.start runs the engine's loop thread: stop it before the interpreter tears down
    # native libraries it may still touch (a daemon thread inside C++ code at exit aborts).
    stop = getattr(rt.generator, "stop", None)
    if stop is not None:
        import atexit

        atexit.register(stop)
    return rt


# The server's schema caps temperature at 2 (as OpenAI's API does); the CLI takes the same range.
MAX_TEMPERATURE = 2.0


def _sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, seed: Optional[int], stop: list[str]):
    from .engine.generate import Sampling

    if temperature > MAX_TEMPERATURE:
        raise LorastackError(f"temperature must be at most {MAX_TEMPERATURE:g}, got {temperature:g}")
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop))


# ------------------------------------------------------------------ base
@base_app.command("info")
def base_info(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Load the base and print its identity (fingerprint, shapes, load time)."""
    from .base import Base

    info = Base.load(OPTS.base, dtype=OPTS.dtype).info()
    if as_json:
        _print_json(info)
    else:
        for k, v in info.items():
            typer.echo(f"{k:>18}: {v}")


# ------------------------------------------------------------------ tasks
@tasks_app.command("list")
def tasks_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the built-in task families."""
    from .tasks import list_tasks

    from .stacks.composite import COMPOSITE

    tasks = list_tasks() + list(COMPOSITE.values())
    if as_json:
        _print_json([{"name": t.name, "description": t.description, "composite": t.name in COMPOSITE} for t in tasks])
        return
    for t in tasks:
        typer.echo(f"{t.name:<16} {t.description}{'  (composite: lorastack stack train)' if t.name in COMPOSITE else ''}")


@tasks_app.command("make")
def tasks_make(
    name: str = typer.Argument(..., help="A built-in task (lorastack tasks list)."),
    n: int = typer.Option(100, "--n", help="Number of records."),
    split: str = typer.Option("train", "--split", help="train, test (disjoint streams, same phrasings) or paraphrase (held-out phrasings)."),
    seed: int = typer.Option(0, "--seed", help="Generator seed (same seed, same records)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write JSONL here instead of stdout (- is stdout)."),
) -> None:
    """Generate a JSONL dataset from a built-in task."""
    from .data import check_output_file, write_jsonl
    from .tasks import get_task

    from .stacks.composite import COMPOSITE

    if out is not None and str(out) == "-":  # the usual spelling of stdout, not a file named "-"
        out = None
    if out:
        check_output_file(out, "--out")

    # Composite tasks (stacks' benchmarks) also have a "long" split: longer inputs than training.
    records = (COMPOSITE[name] if name in COMPOSITE else get_task(name)).generate(n, split=split, seed=seed)
    if out:
        write_jsonl(out, records)
        typer.echo(f"wrote {len(records)} {split} records of {name} to {out}", err=True)
    else:
        for r in records:
            typer.echo(json.dumps(r, ensure_ascii=False))


# ------------------------------------------------------------------ train
@app.command()
def train(
    data: Path = typer.Argument(..., help="JSONL records {prompt|messages, completion}."),
    name: str = typer.Option(..., "--name", help="Adapter name in the library."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank r (size of the update)."),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha; the update is scaled by alpha / rank."),
    targets: str = typer.Option("all-linear", "--targets", help="Comma-separated module names, or all-linear."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: one epoch)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Default 1 epoch when --steps is not given."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (warmup, then cosine decay)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Records per optimizer step."),
    max_len: int = typer.Option(256, "--max-len", help="Longest example in tokens (the prompt is cut from the left)."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, data order and the held-out split."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Held-out JSONL (default: 10% of DATA, at most 200)."),
    description: str = typer.Option("", "--description", help="What the adapter does (shown in lists, searched, routes example-less adapters)."),
    eval_n: Optional[int] = typer.Option(None, "--eval-n", help="Hold out this many records of DATA for eval (0: none; default 10%, at most 200)."),
    checkpoint_every: int = typer.Option(20, "--checkpoint-every", help="Save a resumable checkpoint every N steps (0: never)."),
    resume: bool = typer.Option(False, "--resume", help="Continue this adapter's interrupted run from its last checkpoint (same data and options)."),
    early_stop: Optional[int] = typer.Option(None, "--early-stop", help="Stop after PATIENCE held-out evaluations without a lower loss and keep the best weights."),
    eval_every: int = typer.Option(20, "--eval-every", help="With --early-stop: steps between held-out evaluations."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter of that name."),
    no_autocast: bool = typer.Option(False, "--no-autocast", help="Train in float32 instead of bf16 autocast."),
    all_turns: bool = typer.Option(False, "--all-turns", help="Chat data: learn every assistant turn, not only the last (each in its own context)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train a LoRA adapter on DATA and add it to the library (resumable: see --resume)."""
    from .base import Base
    from .data import read_jsonl
    from .names import validate_name
    from .checkpoint import CheckpointMismatch
    from .train import TrainConfig, checkpoint_for, train_to_library

    validate_name(name)
    records = read_jsonl(data)
    eval_records = read_jsonl(eval_data) if eval_data else None
    if all_turns:
        from .data import every_assistant_turn

        records = every_assistant_turn(records)
    empty = sum(1 for r in records if not str(r.get("completion", "")).strip())
    if empty:  # legal (it teaches "answer nothing"), but almost always a data mistake
        typer.echo(f"note: {empty} of {len(records)} records have an empty completion; they teach the adapter to answer nothing",
                   err=True)
    if eval_data and eval_n is not None:
        raise LorastackError("give --eval FILE or --eval-n N, not both")
    cfg = TrainConfig(rank=rank, alpha=alpha, targets=[t.strip() for t in targets.split(",")] if targets != "all-linear" else targets,
                      steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, max_len=max_len, seed=seed,
                      autocast_bf16=not no_autocast, eval_n=eval_n, checkpoint_every=checkpoint_every,
                      early_stop=early_stop, eval_every=eval_every)
    cfg.validate()
    library = _library()
    checkpoint = checkpoint_for(library, name)
    if not resume and (checkpoint / "state.json").is_file():
        typer.echo(f"note: an interrupted run of {name} has a checkpoint; --resume continues it (this run replaces it)", err=True)
    base = Base.load(OPTS.base, dtype="float32")
    from .eval import scorer_for

    try:
        adapter = train_to_library(
            base, library, records, name, cfg, eval_records=eval_records, description=description,
            data_info={"source": Path(data).name}, scorer=lambda out, r: scorer_for(r)(out, r), overwrite=force,
            resume=resume, progress=not as_json, log=lambda msg: typer.echo(msg, err=True),
        )
    except KeyboardInterrupt:
        typer.echo("training interrupted; the library is unchanged" + _resume_hint(checkpoint), err=True)
        raise typer.Exit(130)
    except CheckpointMismatch:  # its own message says what to do; the resume hint would contradict it
        raise
    except Exception:
        if (checkpoint / "state.json").is_file():
            typer.echo("training stopped; the library is unchanged" + _resume_hint(checkpoint), err=True)
        raise
    tr, m = adapter.card.training, adapter.card.metrics
    if as_json:
        _print_json({"adapter": adapter.name, "path": str(adapter.path), "loss_plot": str(adapter.path / "loss.png"),
                     "training": tr, "metrics": m, "data": adapter.card.data})
        return
    typer.echo(f"added {adapter.name}: {tr['steps']} steps in {tr['seconds']}s ({tr['tokens_per_s']} tok/s), "
               f"loss {m['train_loss_first']:.3f} (first step) -> {m['train_loss_last']:.3f} (mean of the last {min(5, tr['steps'])} steps)"
               + (f", eval loss {m['eval_loss']:.3f}" if "eval_loss" in m else "")
               + (f", held-out exact match {m['eval_exact_match']:.1%} (n={m['eval_exact_match_n']})" if "eval_exact_match" in m else ""))
    if tr.get("stopped_early"):
        typer.echo(f"stopped early after {tr['steps_run']} of {tr['steps']} steps; kept the weights of step {tr['best_step']}")
    typer.echo(f"loss curve: {adapter.path / 'loss.png'}")
    _report_capture(base, library, adapter.name)


def _resume_hint(checkpoint: Path) -> str:
    if (checkpoint / "state.json").is_file():
        return f"; its last checkpoint is in {checkpoint}: run the same command with --resume to continue"
    return ""


def _report_capture(base, library, name: str) -> None:
    """After training: how often `auto` would hand generic requests to the new adapter."""
    from .routing.evaluate import capture_rate
    from .runtime import Runtime

    try:
        info = capture_rate(Runtime(base, library), name)
    except (NotImplementedError, LorastackError) as e:
        typer.echo(f"routing: not measured ({e})", err=True)
        return
    typer.echo(f"routing: auto ({info['router']}) sends {info['captured']}/{info['n']} unrelated generic requests to {name} "
               f"({info['captured'] / info['n']:.1%}; {info['routed']} to any adapter)")


# ------------------------------------------------------------------ adapters
@adapters_app.command("list")
def adapters_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List adapters in the library."""
    adapters = _library().list()
    if as_json:
        _print_json([a.card.model_dump() if hasattr(a.card, "model_dump") else a.card.__dict__ for a in adapters])
        return
    if not adapters:
        typer.echo("the library is empty; train one with `lorastack train DATA --name NAME`")
        return
    for a in adapters:
        acc = a.card.metrics.get("eval_exact_match")
        typer.echo(f"{a.name:<24} r={a.card.rank:<3} base={a.card.base_fingerprint or '?':<16} "
                   f"{'' if acc is None else f'held-out EM {acc:.0%}  '}{a.card.description}")


@adapters_app.command("show")
def adapters_show(name: str = typer.Argument(..., help="Adapter name."), as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Show one adapter's card."""
    a = _library().get(name)
    card = a.card.model_dump() if hasattr(a.card, "model_dump") else dict(a.card.__dict__)
    card["path"] = str(a.path)
    if as_json:
        _print_json(card)
    else:
        for k, v in card.items():
            typer.echo(f"{k:>16}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")


@adapters_app.command("rm")
def adapters_rm(name: str = typer.Argument(..., help="Adapter name."),
                as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Remove an adapter from the library."""
    library = _library()
    library.remove(name)
    from .stacks.store import StackStore

    users = StackStore(library.root).using(name)
    if as_json:
        _print_json({"removed": name, "stacks_using_it": users})
    else:
        typer.echo(f"removed {name}")
    if users:  # a stack names its adapters and would fail only when run
        typer.echo(f"note: stacks {', '.join(users)} use {name}; they fail until it is back (lorastack stack rm NAME, or stack add --force)",
                   err=True)


@adapters_app.command("edit")
def adapters_edit(
    name: str = typer.Argument(..., help="Adapter name."),
    description: Optional[str] = typer.Option(None, "--description", help="New description (shown in lists, searched, routes example-less adapters)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Change an adapter's card (atomically; the weights are untouched)."""
    from .data import check_text

    if description is None:
        raise LorastackError("nothing to change; give --description TEXT")
    check_text(description, "--description")
    a = _library().update_card(name, description=description)
    if as_json:
        _print_json({"adapter": a.name, "description": a.card.description})
    else:
        typer.echo(f"updated {a.name}: description {a.card.description!r}")


@adapters_app.command("examples")
def adapters_examples(
    name: str = typer.Argument(..., help="Adapter name."),
    add: Optional[Path] = typer.Option(None, "--add", help="JSONL of requests {prompt|messages} this adapter should answer, worded your way."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show how many routing examples an adapter stores, or --add your own wordings (routers learn them; weights untouched)."""
    lib = _library()
    if add is None:
        texts = lib.get(name).examples()
        if as_json:
            _print_json({"adapter": name, "examples": texts})
        else:
            typer.echo(f"{name}: {len(texts)} stored examples" + "".join(f"\n  {t[:100]!r}" for t in texts[:5]))
        return
    from .data import prompt_text, read_jsonl

    added, total = lib.add_examples(name, [prompt_text(r) for r in read_jsonl(add, require_completion=False)])
    if as_json:
        _print_json({"adapter": name, "added": added, "stored": total})
    else:
        typer.echo(f"{name}: added {added} examples ({total} stored); the routers refit on next use")


@adapters_app.command("import")
def adapters_import(
    src: Path = typer.Argument(..., help="A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)."),
    name: Optional[str] = typer.Option(None, "--name", help="Default: the card's name or the directory name."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter of that name."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Import a PEFT LoRA trained elsewhere; checks it against the base first."""
    from .base import Base

    base = Base.load(OPTS.base, dtype=OPTS.dtype)
    a = _library().import_dir(src, name, base=base, overwrite=force)
    if as_json:
        _print_json({"adapter": a.name, "rank": a.card.rank, "target_modules": a.card.target_modules, "path": str(a.path)})
        return
    typer.echo(f"imported {a.name} (rank {a.card.rank}, targets {', '.join(a.card.target_modules)})")


@adapters_app.command("export")
def adapters_export(
    spec: str = typer.Argument(..., help="An adapter name, or a mixture SPEC such as a:0.7+b:0.3."),
    dest: Path = typer.Argument(..., help="Directory to write (missing or empty, unless --force)."),
    merged: bool = typer.Option(False, "--merged", help="A Hugging Face model directory with the update merged into the base (transformers, vLLM)."),
    gguf: bool = typer.Option(False, "--gguf", help="A llama.cpp LoRA adapter GGUF, to load next to the base's GGUF with --lora."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Weights of a --merged (float32 or bfloat16) or --gguf (float32 or float16) export; default float32."),
    force: bool = typer.Option(False, "--force", help="Replace DEST if it is not empty."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Export an adapter or mixture: the PEFT directory (default), --merged or --gguf."""
    from .export import GGUF_FILE, check_request, export

    if merged and gguf:
        raise LorastackError("give --merged or --gguf, not both")
    mode = "merged" if merged else "gguf" if gguf else "peft"
    if mode == "peft" and dtype is not None:  # a PEFT export copies the adapter's own files
        raise LorastackError("--dtype applies to --merged and --gguf exports, not to the PEFT directory")
    dtype = dtype or "float32"
    library = _library()
    check_request(library, spec, dest, mode, force)  # a typo fails before the base loads
    base = None
    if mode != "peft":
        from .base import Base

        base = Base.load(OPTS.base, dtype="float32")
    result = export(library, spec, dest, mode=mode, base=base, force=force, dtype=dtype)
    if as_json:
        _print_json(result.to_json())
        return
    typer.echo(f"exported {result.spec} to {result.path} ({mode}: {', '.join(result.files)})")
    if mode == "merged":
        typer.echo(f"load it with: AutoModelForCausalLM.from_pretrained({str(result.path)!r}), or vllm serve {result.path}")
    elif mode == "gguf":
        typer.echo(f"use it with the base's GGUF: llama-cli -m BASE.gguf --lora {result.path / GGUF_FILE}")


# ------------------------------------------------------------------ routing
router_app = typer.Typer(no_args_is_help=True, help="Routers that pick adapters for `--model auto`.")
app.add_typer(router_app, name="router")


@router_app.command("fit")
def router_fit(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Fit the learned gate on the library's stored examples (for auto:learned)."""
    info = _runtime().router("learned").fit()  # with the config's [routing.learned] options (e.g. sentence)
    if as_json:
        _print_json(info)
    else:
        typer.echo(f"fitted learned router on {info['examples']} examples of {info['adapters']} adapters in "
                   f"{info['seconds']}s (train accuracy {info['train_accuracy']:.1%}); saved {info['path']}")
        for twins in info["twins"]:
            typer.echo(f"twins (one job as far as their examples show; the more probable answers): {', '.join(twins)}")


@adapters_app.command("search")
def adapters_search(text: str = typer.Argument(..., help="Text to look for (case-insensitive)."), as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Adapters whose name or description contains TEXT."""
    from .data import check_text

    check_text(text, "TEXT")
    found = _library().search(text)
    if as_json:
        _print_json([a.card.model_dump() for a in found])
        return
    if not found:
        names = _library().names()
        typer.echo(f"no adapter's name or description contains {text!r}"
                   + (f" ({len(names)} adapters: lorastack adapters list)" if names else " (the library is empty)"), err=True)
    for a in found:
        typer.echo(f"{a.name:<24} {a.card.description}")


@app.command("route")
def route_cmd(
    prompt: str = typer.Argument(..., help="The request to route."),
    router: Optional[str] = typer.Option(None, "--router", help="learned, knn or arrow (default: config.toml's [routing] default, learned if unset)."),
    false_route: Optional[float] = typer.Option(None, "--false-route", help="Operating point for this call: share of generic inputs allowed to reach an adapter (default from config)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show which route a router picks for PROMPT, what the decision was made on, and the time taken."""
    from .data import check_text

    if not check_text(prompt, "PROMPT").strip():
        raise LorastackError("PROMPT is empty; give the request to route")
    rt = _runtime()
    r = rt.router(router)
    r.route([prompt])  # first call builds the index (signatures are computed once and stored)
    decision = r.route([prompt], false_route=false_route)[0]
    if as_json:
        _print_json({"router": r.name, **decision.to_json()})
        return
    typer.echo(f"{r.name}: {decision.route}  [{decision.seconds * 1000:.1f} ms]")
    typer.echo(f"  {decision.explain()}" + ("  (the bare base answers)" if decision.abstained else ""))
    if decision.scores:
        typer.echo(f"  scores ({SCORE_MEANING.get(r.name, 'per-adapter router scores')}):")
    for name, score in sorted(decision.scores.items(), key=lambda kv: -kv[1]):
        typer.echo(f"  {score:6.3f}  {name}")


SCORE_MEANING = {
    "knn": "share of the nearest stored examples that belong to each adapter; which adapter, not whether",
    "arrow": "softmax over the adapters' prototype scores",
    "learned": "gate probabilities of the adapters (the rest is 'no expert')",
}


@router_app.command("calibrate")
def router_calibrate(
    data: Path = typer.Option(..., "--data", help="JSONL of your own inputs: {prompt|messages, adapter} (adapter null or 'base': should not be routed)."),
    router: Optional[str] = typer.Option(None, "--router", help="learned or knn (default: the router plain auto uses)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Fit the router's abstention threshold on your own labelled phrasings and save it with the library."""
    from .config import default_router
    from .routing.calibrate import calibrate_on_data

    router = router or default_router()

    info = calibrate_on_data(_runtime(), router, data)
    if as_json:
        _print_json(info)
        return
    per = info["thresholds_before"]
    before = (f"thresholds {min(per.values()):.3f}-{max(per.values()):.3f} (per adapter; shared {info['threshold_before']:.3f})"
              if per and min(per.values()) < max(per.values()) else f"threshold {info['threshold_before']:.3f}")
    typer.echo(f"{router}: {before} -> {info['threshold']:.3f} for every adapter; on your {info['n']} inputs "
               f"{info['accuracy_before']:.1%} -> {info['accuracy']:.1%} routed right (to their adapter, or to the base); "
               f"saved {info['path']}")


@app.command("eval-routing")
def eval_routing(
    tasks: str = typer.Option("", "--tasks", help="Comma-separated built-in tasks, each with an adapter of the same name (default: every such adapter)."),
    data: list[str] = typer.Option([], "--data", help="NAME=FILE.jsonl: your own inputs (with completions) for adapter NAME; repeatable."),
    ood: str = typer.Option("", "--ood", help="Comma-separated tasks with no adapter, added to the unrelated inputs."),
    n: int = typer.Option(100, "--n", help="Inputs per task and column."),
    n_unrelated: int = typer.Option(400, "--n-unrelated", help="Generic unrelated requests (at most ~450 built in)."),
    routers: str = typer.Option("knn,learned,arrow", "--routers", help="Comma-separated routers to compare."),
    end_task: bool = typer.Option(True, "--end-task/--no-end-task", help="Also decode answers: exact match of routes vs oracle."),
    end_task_n: Optional[int] = typer.Option(None, "--end-task-n", help="Decode answers for only the first N inputs per adapter and column."),
    out: Path = typer.Option(Path("out/routing"), "--out", help="Directory for routing.json and routing.png."),
) -> None:
    """Routing top-1 on in-template and held-out paraphrase inputs, abstention on unrelated ones, and end-task accuracy vs the oracle."""
    from .routing.evaluate import evaluate_routing, format_table, parse_data_args

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    rt = _runtime()
    from .tasks import TASKS

    user_data = parse_data_args(data)
    task_list = split(tasks) or ([t for t in rt.served() if t in TASKS and t not in user_data] if not user_data else [])
    res = evaluate_routing(rt, task_list, n, split(ood), n_unrelated, split(routers), out, data=user_data, end_task=end_task,
                           end_task_n=end_task_n)
    for line in format_table(res):
        typer.echo(line)
    typer.echo(f"wrote {out}/routing.json and routing.png")


# ------------------------------------------------------------------ generation
CHAT_HELP = """commands:
  /model SPEC   switch the route (base, an adapter, a:0.7+b:0.3, auto, stack/NAME)
  /route        show which route answers each message (toggle)
  /clear        forget the conversation so far (/reset works too)
  /help         this list
  /quit         leave (Ctrl-D too)"""


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user message to answer."),
    model: str = typer.Option("base", "--model", "-m", help="SPEC: base, an adapter name, a:0.7+b:0.3, or auto[:learned|knn|arrow]."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 decodes greedily; higher samples more freely (at most 2)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this much probability."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest tokens (0: all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (same seed, same sample)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop at this text (repeatable)."),
    explain: bool = typer.Option(False, "--explain", help="Print the routing decision and what it was made on (stderr)."),
    show_route: bool = typer.Option(False, "--show-route", help="Print the route that answered (stderr) for every SPEC; auto always does."),
    false_route: Optional[float] = typer.Option(None, "--false-route", help="With auto: this call's routing operating point."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    json_object: bool = typer.Option(False, "--json-object", help="Constrain the reply to a JSON object."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="Constrain the reply to JSON valid under the schema in FILE."),
) -> None:
    """Generate one reply to PROMPT (a stack: `--model stack/NAME`, its stages' own settings apply).

    With `auto`, the route that answered is printed on stderr ("auto abstained -> base" when no
    expert matched); stdout holds only the reply."""
    import dataclasses

    from .data import check_text

    if not check_text(prompt, "PROMPT").strip():  # as the server refuses it: nothing to answer
        raise LorastackError("PROMPT is empty; give the request to answer")
    sampling = dataclasses.replace(_sampling(max_tokens, temperature, top_p, top_k, seed, stop),
                                   constraint=_constraint(json_object, json_schema))
    _check_names_early(model)
    rt = _runtime()
    _check_model(rt, model)
    stack = _stack_for(rt, model)
    if sampling.constraint is not None and stack is not None:
        raise LorastackError("--json-object / --json-schema do not apply to stacks (each stage has its own settings)")
    if stack is None:  # the server refuses the same; past its context the base only degrades
        prompt_tokens, context = len(rt.base.chat_ids([{"role": "user", "content": prompt}])), rt.context_length()
        if prompt_tokens >= context:
            raise LorastackError(f"the prompt alone is {prompt_tokens} tokens, past the base's context of {context} tokens; shorten it")
        if prompt_tokens + sampling.max_tokens > context:
            raise LorastackError(f"prompt + max_tokens ({prompt_tokens + sampling.max_tokens} tokens) exceeds the base's context "
                                 f"of {context} tokens; lower --max-tokens to at most {context - prompt_tokens}")
    handle = rt.start(model, prompt, sampling, false_route=false_route)
    gen = handle.result()
    line = _route_line(rt, model, handle, explain, show_route and not as_json)
    if line:
        typer.echo(line, err=True)
    if as_json:
        if handle.trace is not None:
            _print_json({"model": model, **handle.stack_result.to_json()})
            return
        decision = handle.decision
        _print_json({"model": model, "route": str(decision.route), "abstained": decision.abstained,
                     "decision": decision.to_json() if rt.router_name(model) else None, "text": gen.text,
                     "finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens,
                     "completion_tokens": gen.completion_tokens})
        return
    typer.echo(gen.text)


def _check_names_early(model: str) -> None:
    """An adapter name the library does not hold fails before the base loads (~8 s for the
    embedded one); `_check_model` then checks the rest (base fit, routers, stacks)."""
    from .route import AutoSpec, is_stack, parse_spec

    if is_stack(model):
        return
    parsed = parse_spec(model)
    if isinstance(parsed, AutoSpec):
        return
    library = _library()
    for name in parsed.names:
        library.get(name)  # NotFoundError, naming close matches


def _check_model(rt, model: str) -> None:
    """Fail on a bad SPEC (unknown adapter, router or stack) before any work, with one line."""
    stack = _stack_for(rt, model)
    if stack is not None:
        stack[0].check(stack[1])
    else:
        rt.route(model)


def _constraint(json_object: bool, json_schema: Optional[Path]):
    """The structured-output constraint `generate` was asked for (None: free text)."""
    from .engine.constrain import Constraint

    if json_schema is None:
        return Constraint.json_object() if json_object else None
    if json_object:
        raise LorastackError("give --json-object or --json-schema, not both")
    try:
        schema = json.loads(json_schema.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LorastackError(f"--json-schema {json_schema}: cannot read a JSON schema ({e})") from e
    return Constraint.json_schema(schema)


def _route_line(rt, model: str, handle, explain: bool, show: bool) -> str | None:
    """The route that answered, for stderr: routed SPECs always say where they went (or that
    they abstained), fixed ones and stacks only with `show` or `explain`; `explain` adds what
    the decision was made on."""
    if handle.trace is not None:
        return "[route] " + " -> ".join(f"{t.stage}[{t.route or t.kind}]" for t in handle.trace) if explain or show else None
    decision = handle.decision
    if rt.router_name(model) is None:
        return f"[route] {decision.route}" if explain or show else None
    if explain:
        return f"[route] {decision.route}: {decision.explain()}"
    return f"[route] {model} abstained → base" if decision.abstained else f"[route] {model} → {decision.route}"


def _fit_context(rt: "Runtime", history: list[dict[str, str]], max_tokens: int, keep_first: bool) -> int:
    """Drops the oldest user/assistant exchanges until the conversation plus a full reply fits
    the base's context, and returns how many messages went: a long chat keeps answering
    instead of failing (or being cut short) once it outgrows the window. The system message
    (`keep_first`) and the new message always stay; if they alone leave no room for an answer,
    nothing is dropped and the engine refuses the message with one line."""
    first, context = (1 if keep_first else 0), rt.context_length()
    if len(rt.base.chat_ids(history[:first] + history[-1:])) >= context:
        return 0
    dropped = 0
    while len(history) - first > 1 and len(rt.base.chat_ids(history)) + max_tokens > context:
        del history[first : first + 2]
        dropped += 2
    return dropped


@app.command()
def chat(
    model: str = typer.Option("base", "--model", "-m", help="SPEC to chat with (base, an adapter, a:0.7+b:0.3, auto, stack/NAME)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 decodes greedily; higher samples more freely (at most 2)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message opening the conversation."),
    explain: bool = typer.Option(False, "--explain", help="Print each turn's routing decision (stderr); /route toggles it."),
    false_route: Optional[float] = typer.Option(None, "--false-route", help="With auto: the routing operating point."),
) -> None:
    """Interactive chat. /help lists the commands: /model SPEC, /route, /clear, /quit."""
    rt = _runtime()
    _check_model(rt, model)  # fail before the first prompt on a bad SPEC
    sampling = _sampling(max_tokens, temperature, 1.0, 0, None, [])
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    typer.echo(f"chatting with {model} on {rt.base.name}; /help for commands", err=True)
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "")  # piped input: no prompt glued to replies
        except (EOFError, KeyboardInterrupt):
            typer.echo("", err=True)
            return
        command, _, arg = line.strip().partition(" ")
        if command in {"/quit", "/exit"}:
            return
        if command in {"/reset", "/clear"}:
            history = history[:1] if system else []
            typer.echo("(history cleared)", err=True)
            continue
        if command == "/help":
            typer.echo(CHAT_HELP, err=True)
            continue
        if command == "/route":
            explain = not explain
            typer.echo(f"(route display {'on' if explain else 'off'})", err=True)
            continue
        if command == "/model":
            try:
                _check_model(rt, arg.strip())
            except LorastackError as e:
                typer.echo(f"error: {e}", err=True)
                continue
            model = arg.strip()
            typer.echo(f"(now chatting with {model})", err=True)
            continue
        if command.startswith("/") and len(command) > 1:
            typer.echo(f"error: unknown command {command!r}; /help lists the commands", err=True)
            continue
        if not line.strip():
            continue
        try:
            from .data import check_text

            check_text(line, "message")
        except LorastackError as e:
            typer.echo(f"error: {e}", err=True)
            continue
        history.append({"role": "user", "content": line})
        dropped = _fit_context(rt, history, sampling.max_tokens, keep_first=bool(system))
        if dropped:
            typer.echo(f"(dropped the {dropped} oldest messages to fit the base's context of {rt.context_length()} tokens)", err=True)
        # A stack answers each message on its own (its stages read the last user message).
        try:
            handle = rt.start(model, history, sampling, false_route=false_route)
            reply = handle.result().text
        except LorastackError as e:  # one bad message (too long, a removed adapter) ends no chat
            history.pop()
            typer.echo(f"error: {e}", err=True)
            continue
        shown = _route_line(rt, model, handle, explain, explain)
        if shown:
            typer.echo(shown, err=True)
        history.append({"role": "assistant", "content": reply})
        typer.echo(f"{model}> {reply}")


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("base", "--model", "-m", help="SPEC to evaluate (auto: routed per input, accuracy per route too)."),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL with completions."),
    task: Optional[str] = typer.Option(None, "--task", help="A built-in task (its test split)."),
    n: int = typer.Option(200, "--n", help="Examples from --task, or the first N of --data."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --task test records."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows decoded at once (a new one starts as soon as one finishes)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Per-example results JSONL (default: eval-<model>.jsonl)."),
    full_outputs: bool = typer.Option(False, "--full-outputs", help="Decode every answer to the end. By default a "
                                      "row stops once it can no longer match exactly (same score, faster; its output "
                                      "is then the prefix so far, marked stopped_early)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Exact-match accuracy of a SPEC on a dataset or a built-in task."""
    from .data import check_output_file, read_jsonl, write_jsonl
    from .eval import evaluate

    if (data is None) == (task is None):
        raise LorastackError("give exactly one of --data FILE or --task NAME")
    if n < 1:
        raise LorastackError(f"--n must be >= 1, not {n}")
    if task:
        from .tasks import get_task

        records = get_task(task).generate(n, split="test", seed=seed)
    else:
        records = read_jsonl(data)[:n]

    out = out or Path(f"eval-{model.replace('/', '_').replace(':', '_').replace('+', '_')}.jsonl")
    check_output_file(out, "--out")
    rt = _runtime()
    _check_model(rt, model)
    result = evaluate(rt, model, records, batch_size=batch_size, label=model, stop_early=not full_outputs)
    write_jsonl(out, result.rows)
    routed = rt.router_name(model) is not None
    summary = {**result.summary(), "results": str(out), **({"by_route": result.by_route()} if routed else {})}
    if as_json:
        _print_json(summary)
    else:
        typer.echo(f"{model}: {result.correct}/{result.n} exact match = {result.accuracy:.1%} "
                   f"({result.seconds:.1f}s); per-example results in {out}")
        for route, r in summary.get("by_route", {}).items():
            label = f"{route} (auto abstained)" if route == "base" else route
            typer.echo(f"  {label:<32} {r['correct']}/{r['n']} = {r['accuracy']:.1%}")


@app.command()
def demo(
    tasks: str = typer.Option("reverse_words,title_case,json_field,date_format", "--tasks", help="Comma-separated built-in tasks."),
    n_test: int = typer.Option(200, "--n-test", help="Test examples per task."),
    out: Path = typer.Option(Path("out/demo"), "--out", help="Directory for matrix.json, matrix.png and examples.jsonl."),
    retrain: bool = typer.Option(False, "--retrain", help="Train again even if the adapters exist."),
) -> None:
    """The main job: train (or reuse) one adapter per task and print the accuracy matrix."""
    from .demo import run_demo

    run_demo([t.strip() for t in tasks.split(",") if t.strip()], n_test=n_test, out_dir=out, retrain=retrain,
             base_source=OPTS.base, library_dir=OPTS.library, dtype=OPTS.dtype, **_int8())


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 exposes it to the network: set an API key)."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' (default: $LORASTACK_API_KEY)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Rows decoded together."),
    max_resident: int = typer.Option(16, "--max-resident", help="Adapters resident in LoRA slots (LRU beyond)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Waiting requests before 429 + Retry-After."),
    max_tokens: int = typer.Option(1024, "--max-tokens-cap", help="Largest max_tokens a request may ask for."),
    max_body: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted (413 beyond)."),
    max_prompt: int = typer.Option(4096, "--max-prompt-tokens", help="Longest prompt accepted, in tokens (400 beyond; the base's context also applies)."),
    import_root: list[Path] = typer.Option([], "--import-root", help="Directory HTTP imports may read from (repeatable; none = imports off)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level: " + ", ".join(LOG_LEVELS) + "."),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="Serve /docs and /openapi.json (behind the API key when one is set)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log one line per request to stderr: client, method, path, status, model, route, tokens, latency."),
) -> None:
    """Serve the base and the library over an OpenAI-compatible HTTP API."""
    import socket

    import uvicorn

    from .runtime import Runtime
    from .serve import ServeSettings, create_app

    if not 1 <= port <= 65535:
        raise LorastackError(f"--port must be between 1 and 65535, got {port}")
    if log_level not in LOG_LEVELS:
        raise LorastackError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    for option, value in (("--max-batch", max_batch), ("--max-resident", max_resident)):
        if value < 1:
            raise LorastackError(f"{option} must be >= 1, got {value}")
    settings = ServeSettings.with_env(api_key=api_key, max_queue=max_queue, max_tokens_cap=max_tokens,
                                      default_max_tokens=min(256, max_tokens), max_body_bytes=max_body, max_prompt_tokens=max_prompt,
                                      import_roots=tuple(import_root), docs=docs, access_log=access_log)
    from .base import Base

    # Bind first: a busy port fails in a second, before the model loads and before we
    # announce a URL; uvicorn then serves on this very socket (no window for a race).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LorastackError(f"cannot listen on {host}:{port}: {e.strerror} (pick another --port or --host)") from None
    base = Base.load(OPTS.base, dtype=OPTS.dtype)
    rt = Runtime(base, _library(), max_batch=max_batch, max_resident=max_resident, **_int8())
    web = create_app(rt, settings)
    url = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
    auth, key_note = "", ""
    if api_key:  # given on the command line: do not echo the secret back
        auth, key_note = ' -H "Authorization: Bearer YOUR_KEY"', "      (YOUR_KEY: the --api-key value)"
    elif settings.api_key:
        auth = ' -H "Authorization: Bearer $LORASTACK_API_KEY"'
    typer.echo(f"lorastack serving {base.name} ({base.fingerprint}, {str(base.dtype).replace('torch.', '')}) with {len(rt.served())} adapters at {url}/v1")
    typer.echo(f"auth: {'API key required' if settings.api_key else 'none (set --api-key or LORASTACK_API_KEY)'}; "
               f"imports: {', '.join(str(r) for r in settings.import_roots) or 'off'}")
    typer.echo(f"try:  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
               f"""-d '{{"model": "auto", "messages": [{{"role": "user", "content": "Reverse the order of these words: red green blue"}}], "temperature": 0}}'""")
    if key_note:
        typer.echo(key_note)
    config = uvicorn.Config(web, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def _stack_for(rt, model: str):
    """(runner, spec) when `model` is `stack/NAME`, else None."""
    from .route import is_stack, parse_spec

    if not is_stack(model):
        return None
    parsed = parse_spec(model)
    from .stacks import StackRunner, StackStore

    return StackRunner(rt), StackStore(rt.library.root).get(parsed.name)


# ------------------------------------------------------------------ stacks
stack_app = typer.Typer(no_args_is_help=True, help="Stacks: pipelines of experts defined in YAML (`--model stack/NAME`).")
app.add_typer(stack_app, name="stack")


def _stack_source(spec_or_name: str):
    """A YAML file path, or `stack/NAME` / `NAME` of a stored stack."""
    from .stacks import StackStore, load_stack

    if spec_or_name.endswith((".yaml", ".yml")) or Path(spec_or_name).is_file():
        return load_stack(spec_or_name)
    return StackStore(_library().root).get(spec_or_name.removeprefix("stack/"))


@stack_app.command("run")
def stack_run(
    spec: str = typer.Argument(..., help="A stack YAML file, or stack/NAME from the library."),
    text: str = typer.Argument(..., help="The input."),
    trace: bool = typer.Option(False, "--trace", help="Print every stage: input, route, output, time."),
    as_json: bool = typer.Option(False, "--json", help="The whole result with its trace as JSON."),
) -> None:
    """Run a stack on one input."""
    from .stacks import StackRunner

    stack = _stack_source(spec)
    result = StackRunner(_runtime()).run(stack, text)
    if as_json:
        _print_json(result.to_json())
    elif trace:
        for t in result.trace:
            route = f" [{t.route}]" if t.route else ""
            typer.echo(f"--- {t.stage} ({t.kind}){route} {t.ms:.0f} ms, {t.completion_tokens} tokens", err=True)
            typer.echo(f"    in : {t.input!r}", err=True)
            if t.scores:
                typer.echo(f"    scores: {t.scores}", err=True)
            typer.echo(f"    out: {t.output!r}", err=True)
    if result.error:
        raise LorastackError(f"stack {stack.name!r} failed at {result.error}")
    if not as_json:
        typer.echo(result.output)


@stack_app.command("add")
def stack_add(spec: Path = typer.Argument(..., help="A stack YAML file."),
              force: bool = typer.Option(False, "--force", help="Replace a stored stack of the same name.")) -> None:
    """Validate a stack (its adapters must exist) and store it in the library as stack/NAME."""
    from .stacks import StackRunner, StackStore, load_stack

    stack = load_stack(spec)
    StackRunner(_runtime()).check(stack)
    StackStore(_library().root).add(stack, overwrite=force)
    typer.echo(f"added stack/{stack.name} ({len(stack.stages)} stages)")


@stack_app.command("train")
def stack_train(
    spec: Path = typer.Argument(..., help="A stack YAML whose trainable stages say `train: true`."),
    data: Path = typer.Argument(..., help="JSONL records {prompt, completion, stages: {STAGE: reference output}}."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps per stage (default: one epoch)."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank of each stage's adapter."),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha; the update is scaled by alpha / rank."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    seed: int = typer.Option(0, "--seed", help="Training seed."),
    force: bool = typer.Option(False, "--force", help="Replace stage adapters that already exist."),
    add: bool = typer.Option(True, "--add/--no-add", help="Also store the stack in the library as stack/NAME."),
) -> None:
    """Train one adapter per `train: true` stage from one file, then store the stack."""
    from .base import Base
    from .data import read_jsonl
    from .stacks import StackRunner, StackStore, load_stack
    from .stacks.train import stage_records, train_stack
    from .train import TrainConfig

    stack = load_stack(spec)
    records = read_jsonl(data)
    stage_records(stack, records)  # data problems fail before any training starts
    cfg = TrainConfig(rank=rank, alpha=alpha, steps=steps, lr=lr, seed=seed)
    cfg.validate()
    library = _library()
    try:
        adapters = train_stack(Base.load(OPTS.base, dtype="float32"), library, stack, records, cfg, overwrite=force)
    except KeyboardInterrupt:
        typer.echo("training interrupted; stages already trained stay in the library, the rest are unchanged", err=True)
        raise typer.Exit(130)
    for a in adapters:
        typer.echo(f"trained {a.name}: loss {a.card.metrics.get('train_loss_first', float('nan')):.3f} -> "
                   f"{a.card.metrics.get('train_loss_last', float('nan')):.3f}")
    if add:
        StackRunner(_runtime()).check(stack)
        StackStore(library.root).add(stack, overwrite=True)
        typer.echo(f"added stack/{stack.name}")


@stack_app.command("list")
def stack_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Stored stacks."""
    from .stacks import StackStore

    store = StackStore(_library().root)
    specs = [store.get(n) for n in store.names()]
    if as_json:
        _print_json([{"name": f"stack/{s.name}", "stages": [st.name for st in s.stages], "description": s.description} for s in specs])
        return
    if not specs:
        typer.echo("no stacks yet (lorastack stack add SPEC.yaml)", err=True)
    for s in specs:
        typer.echo(f"stack/{s.name:<24} {' -> '.join(' & '.join(w) for w in s.order)}  {s.description}")


@stack_app.command("show")
def stack_show(name: str = typer.Argument(..., help="stack/NAME, NAME or a YAML file.")) -> None:
    """Print a stored stack's YAML."""
    from .stacks.spec import dump_stack

    typer.echo(dump_stack(_stack_source(name)), nl=False)


@stack_app.command("rm")
def stack_rm(name: str = typer.Argument(..., help="stack/NAME or NAME.")) -> None:
    """Remove a stored stack (its adapters stay)."""
    from .stacks import StackStore

    StackStore(_library().root).remove(name.removeprefix("stack/"))
    typer.echo(f"removed stack/{name.removeprefix('stack/')}")


# ------------------------------------------------------------------ composition
compose_app = typer.Typer(no_args_is_help=True, help="New adapters from library adapters: merge, few-shot search, subtract.")
app.add_typer(compose_app, name="compose")


@compose_app.command("merge")
def compose_merge(
    adapters: list[str] = typer.Argument(..., help="Library adapters to merge (one: svd/prune/--subtract it alone)."),
    name: str = typer.Option(..., "--name", help="Name of the new adapter."),
    method: str = typer.Option("cat", "--method", help="linear|cat|svd|ties|dare_linear|dare_ties|magnitude_prune."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated, one per adapter, negative allowed (task arithmetic; default 1/n; 1 for ties/dare_ties)."),
    density: Optional[float] = typer.Option(None, "--density", help="Fraction kept by ties/dare/magnitude_prune (default 0.5)."),
    svd_rank: Optional[int] = typer.Option(None, "--svd-rank", help="Rank of svd/ties/dare/magnitude_prune results (default: the largest parent rank)."),
    subtract: Optional[str] = typer.Option(None, "--subtract", help="Subtract this general adapter from every parent first (GenKnowSub)."),
    seed: int = typer.Option(0, "--seed", help="DARE's random drops."),
    routable: bool = typer.Option(False, "--routable", help="Let `auto` pick it (it then competes with its parents, whose examples it stores)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter of that name."),
) -> None:
    """Merge adapters into a new library adapter (PEFT format; its card records parents, method, weights).
    Use it by name: it is not routable unless --routable."""
    import time

    from .compose import merge, parse_weights

    t0 = time.perf_counter()
    adapter = merge(_library(), adapters, name, method=method, weights=parse_weights(weights, len(adapters)), density=density,
                    svd_rank=svd_rank, subtract=subtract, seed=seed, overwrite=force, routable=routable)
    c = adapter.card.model_dump()["composition"]
    mix = ", ".join(f"{p['name']}:{p['weight']:g}" for p in c["parents"])
    typer.echo(f"added {adapter.name}: {method} of {mix}"
               + (f" minus {subtract}" if subtract else "") + f", rank {adapter.card.rank}, {time.perf_counter() - t0:.1f}s"
               + ("" if routable else f"; not routable (--model {adapter.name}; --routable lets auto pick it)"))


@compose_app.command("general")
def compose_general(
    name: str = typer.Option("general", "--name", help="Name of the general adapter."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="JSONL {prompt|messages} of your own generic requests (default: built-in ones)."),
    n: int = typer.Option(256, "--n", help="Built-in generic prompts to answer (without --prompts)."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Longest answer kept; answers still running are dropped."),
    steps: int = typer.Option(100, "--steps", help="Training steps."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank."),
    seed: int = typer.Option(0, "--seed", help="Training seed."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter of that name."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train a general adapter for --subtract by self-distillation: generic requests answered by the base itself."""
    from .base import Base
    from .compose.general import train_general
    from .data import prompt_text, read_jsonl
    from .train import TrainConfig

    _library().check_new(name, force)  # before any model loads
    texts = [prompt_text(r) for r in read_jsonl(prompts, require_completion=False)] if prompts else None
    cfg = TrainConfig(rank=rank, alpha=2.0 * rank, steps=steps, seed=seed, eval_generate=0)
    cfg.validate()
    rt = _runtime()
    base = Base.load(OPTS.base, dtype="float32")
    try:
        adapter = train_general(base, rt, name, cfg, prompts=texts, n=n, max_tokens=max_tokens,
                                source=f"prompts of {prompts.name}" if prompts else "built-in generic prompts",
                                overwrite=force, progress=not as_json, log=lambda msg: typer.echo(msg, err=True))
    except KeyboardInterrupt:
        typer.echo("interrupted; the library is unchanged", err=True)
        raise typer.Exit(130)
    if as_json:
        _print_json({"adapter": adapter.name, "data": adapter.card.data, "training": adapter.card.training,
                     "metrics": adapter.card.metrics, "routable": adapter.card.routable})
        return
    typer.echo(f"added {adapter.name} ({adapter.card.data['records']} self-distilled answers, {adapter.card.training['steps']} steps); "
               f"not routable; use it with --subtract {adapter.name}")


@compose_app.command("fewshot")
def compose_fewshot(
    data: Path = typer.Option(..., "--data", help="JSONL few-shot examples {prompt|messages, completion} (5-20 is typical)."),
    name: str = typer.Option(..., "--name", help="Name of the new adapter."),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="Comma-separated adapters to mix (default: the router's top N)."),
    top: int = typer.Option(8, "--top", help="Candidates picked by the router when --candidates is not given."),
    budget: int = typer.Option(40, "--budget", help="Loss evaluations (forward passes over all examples) the search may spend."),
    l1: float = typer.Option(0.05, "--l1", help="L1 penalty on the weights (LoraHub)."),
    search: str = typer.Option("gradient", "--search", help="gradient (Adam on the K weights; the default: it won the few-shot benchmark) or cma (gradient-free, LoraHub)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the search (same seed, same weights)."),
    subtract: Optional[str] = typer.Option(None, "--subtract", help="Subtract this general adapter from every candidate (GenKnowSub)."),
    svd_rank: Optional[int] = typer.Option(None, "--svd-rank", help="Compress the result to this rank (lossy; default: exact cat)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter of that name."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Find mixture weights over library adapters from a few examples and add the result as an adapter."""
    from tqdm.auto import tqdm

    from .compose import fewshot, read_fewshot
    from .compose.fewshot import check_search_options
    from .names import validate_name

    validate_name(name)
    check_search_options(search, budget, l1, top)  # these and bad files fail before the base loads
    records = read_fewshot(data)
    names = [c.strip() for c in candidates.split(",") if c.strip()] if candidates is not None else None
    if names is not None and not names:
        raise LorastackError("--candidates is empty")
    if names:
        library = _library()
        for n in names:
            library.get(n)  # an unknown candidate is named (with close matches) at once
    rt = _runtime()
    bar = tqdm(total=budget, desc="few-shot search", unit="eval", disable=as_json)

    def progress(done: int, best: float) -> None:
        bar.n = min(done, budget)
        bar.set_postfix(best=f"{best:.4f}")
        bar.refresh()

    try:
        adapter, result = fewshot(rt, records, name, candidates=names, top=top, search=search, budget=budget, l1=l1, seed=seed,
                                  subtract=subtract, svd_rank=svd_rank, overwrite=force, progress=progress)
    except KeyboardInterrupt:
        bar.close()
        typer.echo("few-shot search interrupted; the library is unchanged", err=True)
        raise typer.Exit(130)
    bar.close()
    if as_json:
        _print_json({"adapter": adapter.name, "rank": adapter.card.rank, **result.to_json()})
        return
    mix = ", ".join(f"{n}:{w:.3f}" for n, w in zip(result.candidates, result.weights))
    typer.echo(f"added {adapter.name} (rank {adapter.card.rank}): {mix}; loss {result.uniform_loss:.4f} (uniform) -> "
               f"{result.loss:.4f} in {result.evaluations} evaluations, {result.seconds:.1f}s")


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits, aborts) from click and from the click copy newer typers vendor
    (`typer._click`, whose classes do not subclass click's): both must end in one line."""
    usage, exits, aborts = [click.ClickException], [click.exceptions.Exit], [click.exceptions.Abort]
    try:
        from typer._click import exceptions as tce  # typer >= 0.2x

        usage.append(tce.ClickException)
    except ImportError:
        pass
    from typer import exceptions as te

    exits += [c for c in (getattr(te, "Exit", None),) if c]
    aborts += [c for c in (getattr(te, "Abort", None),) if c]
    return tuple(usage), tuple(exits), tuple(aborts)


USAGE_ERRORS, EXITS, ABORTS = _click_errors()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    try:
        # Without standalone mode click returns a command's `typer.Exit(code)` instead of
        # raising it (an interrupted train ends with Exit(130)): pass that code on.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except EXITS as e:
        sys.exit(e.exit_code)
    except USAGE_ERRORS as e:
        e.show()
        sys.exit(e.exit_code)
    except (*ABORTS, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except LorastackError as e:
        if OPTS.debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
