"""Datasets: JSONL records `{"prompt" | "messages", "completion"}`, validated line by line.

The usual shapes from other tools load too (`normalize_record`): OpenAI/TRL chat
`messages` ending in an assistant turn, `{input, output}`, Alpaca `{instruction, input, output}`.

Every problem names the file and the line, because a user with a 10k-line file must be
able to jump straight to the bad record.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import DataError, LorastackError

Record = dict[str, Any]
ROLES = {"system", "user", "assistant"}


FORMATS = ("{prompt, completion}", "{messages, completion}", "{messages} ending with an assistant turn (OpenAI/TRL chat)",
           "{input, output}", "{instruction, input?, output} (Alpaca)")


def _text_parts(message: Any, where: str) -> Any:
    """OpenAI's content-parts form (`[{"type": "text", "text": ...}, ...]`) as one string, as
    the server reads it; other part types (images, audio) cannot train a text model."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = message["content"]
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise DataError(f"{where}: content parts must all be {{\"type\": \"text\", \"text\": ...}}")
    return {**message, "content": "".join(p["text"] for p in parts)}


def normalize_record(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """Bring the common dataset shapes to lorastack's `{prompt | messages, completion}`.

    - OpenAI/TRL chat `{"messages": [..., {"role": "assistant", ...}]}` with no completion:
      the last assistant turn is the completion (loss on it), the turns before are the prompt.
    - `{"input", "output"}`: input is the prompt.
    - Alpaca `{"instruction", "input"?, "output"}`: instruction, then the input on its own
      paragraph when there is one.
    Other keys (task, stages, ...) are kept.
    """
    if isinstance(obj.get("messages"), list):
        obj = {**obj, "messages": [_text_parts(m, f"{where}: messages[{i}]") for i, m in enumerate(obj["messages"])]}
    if "completion" in obj:
        last = obj["messages"][-1] if isinstance(obj.get("messages"), list) and obj["messages"] else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            raise DataError(f"{where}: 'messages' ends with an assistant turn and 'completion' is given too; keep one answer")
        return obj
    if "messages" in obj and isinstance(obj["messages"], list) and obj["messages"]:
        last = obj["messages"][-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            if len(obj["messages"]) < 2:
                raise DataError(f"{where}: 'messages' has only an assistant turn; nothing to answer")
            if not isinstance(last.get("content"), str):
                raise DataError(f"{where}: the last assistant turn has no text 'content' to learn (tool calls are not trained on)")
            return {**obj, "messages": obj["messages"][:-1], "completion": last["content"]}
        raise DataError(f"{where}: 'messages' must end with an assistant turn (the answer to learn), or give 'completion'")
    if "output" in obj:
        if not isinstance(obj["output"], str):
            raise DataError(f"{where}: 'output' must be a string, got {type(obj['output']).__name__}")
        rest = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
        if "instruction" in obj:
            instruction, extra = obj["instruction"], obj.get("input", "")
            if not isinstance(instruction, str) or not isinstance(extra, str):
                raise DataError(f"{where}: 'instruction' and 'input' must be strings")
            prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        elif "input" in obj:
            prompt = obj["input"]
        else:
            raise DataError(f"{where}: 'output' needs an 'input' or an 'instruction'")
        return {**rest, "prompt": prompt, "completion": obj["output"]}
    return obj


def check_text(text: str, where: str) -> str:
    """`text` if it can be encoded (JSON's \\ud800 escapes and surrogate-escaped argv bytes
    cannot, and the tokenizer would fail deep inside with a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: not valid Unicode text (unpaired surrogate {text[e.start]!r} at character {e.start + 1})") from None
    return text


def validate_record(obj: Any, where: str) -> Record:
    """Check one record's shape (after `normalize_record`); `where` is 'file:line'."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    obj = normalize_record(obj, where)
    for key in ("prompt", "completion"):
        if isinstance(obj.get(key), str):
            check_text(obj[key], f"{where}: '{key}'")
    for i, m in enumerate(obj.get("messages") or []):
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            check_text(m["content"], f"{where}: messages[{i}]")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise DataError(f"{where}: a record needs exactly one of 'prompt' or 'messages' (accepted shapes: {'; '.join(FORMATS)})")
    if has_prompt and not isinstance(obj["prompt"], str):
        raise DataError(f"{where}: 'prompt' must be a string")
    if has_prompt and not obj["prompt"].strip():
        raise DataError(f"{where}: 'prompt' is empty")
    if has_messages:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a string 'content'")
            if m.get("role") not in ROLES:
                raise DataError(
                    f"{where}: messages[{i}] has role {m.get('role')!r}; use one of {sorted(ROLES)}"
                )
    if "completion" not in obj:
        raise DataError(f"{where}: missing 'completion' (or an 'output', or a final assistant message)")
    if not isinstance(obj["completion"], str):
        raise DataError(f"{where}: 'completion' must be a string")
    return obj


def parse_json_line(raw: bytes, where: str) -> Any:
    """One JSONL line as a Python value (None for a blank line); every failure is a
    DataError naming `where`: bad UTF-8, bad JSON, nesting too deep for the parser."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    line = line.rstrip("\r\n")  # a trailing newline would move the error column to "line 2"
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal too long to convert
        raise DataError(f"{where}: invalid JSON ({e})") from None


def read_jsonl(path: str | Path, require_completion: bool = True) -> list[Record]:
    """Read and validate a JSONL dataset; blank lines are allowed and skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a directory, FIFO or device cannot be a dataset)")
    records: list[Record] = []
    problems: list[str] = []
    # Read bytes and decode per line, so a bad byte is reported at its line instead of as
    # a UnicodeDecodeError from deep inside the file iterator. Every bad line is collected,
    # so a user fixes the whole file in one pass instead of one error per run.
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                obj = parse_json_line(raw, where)
                if obj is None:
                    continue
                if not require_completion and isinstance(obj, dict) and "completion" not in obj and "output" not in obj \
                        and not (isinstance(obj.get("messages"), list) and obj["messages"]
                                 and isinstance(obj["messages"][-1], dict) and obj["messages"][-1].get("role") == "assistant"):
                    obj = {**obj, "completion": ""}
                records.append(validate_record(obj, where))
            except DataError as e:
                problems.append(str(e))
    if problems:
        raise DataError(bad_lines_message(path, problems))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def every_assistant_turn(records: list[Record]) -> list[Record]:
    """Chat records trained on every assistant turn, not only the last: each earlier
    assistant turn becomes a record of its own (the turns before it as the prompt, it as the
    completion), so every reply is learnt in the context it was given in. Records without
    earlier assistant turns pass through unchanged (`train --all-turns`)."""
    out: list[Record] = []
    for n, r in enumerate(records):
        msgs = r.get("messages") or []
        # One conversation's records share a `conversation` key, so that the held-out split
        # keeps them together: a held-out turn must not be another record's training context.
        group = {"conversation": r.get("conversation", f"#{n}")}
        for i, m in enumerate(msgs):
            if m.get("role") == "assistant" and any(p.get("role") == "user" for p in msgs[:i]):
                out.append({**r, **group, "messages": msgs[:i], "completion": m["content"]})
        out.append({**r, **group})
    return out


MAX_REPORTED = 20


def bad_lines_message(path: Path, problems: list[str], limit: int = MAX_REPORTED) -> str:
    """One problem as one line; several as a count, then each (up to `limit`) on its own line."""
    if len(problems) == 1:
        return problems[0]
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    more = f"\n  … and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{path}: {len(problems)} bad lines:\n{shown}{more}"


def check_output_file(path: str | Path, option: str) -> None:
    """Refuses an output path that cannot be written as a file, before the work whose results
    it would hold runs (an eval that ends in IsADirectoryError loses every answer)."""
    path = Path(path)
    if path.is_dir():
        raise LorastackError(f"{option} {path} is a directory; give a file path")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise LorastackError(f"{option} {path}: {above} is a file, not a directory")


def write_jsonl(path: str | Path, records: Iterable[Record]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def messages_of(record: Record) -> list[dict[str, str]]:
    """The conversation to send to the model (the completion is the reply to it)."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return [{"role": "user", "content": record["prompt"]}]


def prompt_text(record: Record) -> str:
    """A plain-text view of the input, for routing signatures and reports."""
    if "prompt" in record:
        return record["prompt"]
    return "\n".join(m["content"] for m in record["messages"] if m["role"] != "assistant")


def split_holdout(records: list[Record], fraction: float, seed: int, max_n: int = 200,
                  n: int | None = None) -> tuple[list[Record], list[Record]]:
    """Deterministic train/held-out split; the held-out part is small but never empty
    when there are at least 2 records. `n` asks for exactly that many held out (0: none).
    Records that share a `conversation` value (`every_assistant_turn` sets it; user data may
    too) go to the same side, whole groups being held out until `n` is reached."""
    if len(records) < 2 or n == 0:
        return list(records), []
    n_eval = min(n, len(records) - 1) if n is not None else max(1, min(max_n, int(len(records) * fraction)))
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.get("conversation", ("#record", i)), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for members in order:
        if len(held) >= n_eval or len(held) + len(members) >= len(records):
            break
        held.update(members)
    if not held:  # one conversation only: nothing to keep apart, so split its records
        idx = list(range(len(records)))
        random.Random(seed).shuffle(idx)
        held = set(idx[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals
