"""Logprobs in OpenAI's response shapes: `/v1/completions` (`logprobs=N`, `echo`) and
`/v1/chat/completions` (`logprobs`, `top_logprobs`).

Generated tokens' logprobs are recorded by the engine where it picks each token (from the
logits of that row's own route); a prompt's are computed by one scoring forward
(`engine.score.prompt_logprobs`) run on the engine's thread, every prompt under the route
that answers it. Both are the model's raw distribution (log-softmax before temperature,
top-k and top-p), as vLLM reports by default.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..engine.engine import Engine, Request as EngineRequest
from ..engine.sampling import TokenLogprob
from ..engine.score import prompt_logprobs
from ..errors import LorastackError
from ..route import Route
from .accesslog import note_tokens
from .errors import ApiError, from_lorastack
from .schemas import (
    ChatCompletionRequest, ChatLogprobs, ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest, TopLogprob,
)

WINDOW = 6  # tokens of left context when decoding one token's text (spacing, merges)


def token_strings(tokenizer, ids: Sequence[int], skip_special: bool) -> list[str]:
    """Each token's share of the decoded text, so the pieces concatenate to the decoded whole.

    Decoding one id alone loses spacing rules and splits multi-byte characters, so each token
    is decoded with a few tokens of left context and the new text taken as its piece; a token
    ending inside a UTF-8 character gets "" and the character goes to the token completing it.
    Linear in the sequence (a fixed window), not quadratic like decoding every prefix.
    """
    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode(list(part), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    out: list[str] = []
    start = 0  # first token whose text is not yet out
    for i in range(len(ids)):
        ctx = max(0, start - WINDOW)
        now = decode(ids[ctx : i + 1])
        if now.endswith("\ufffd") and i + 1 < len(ids):
            out.append("")  # an incomplete character: its bytes continue in the next token
            continue
        before = decode(ids[ctx:start])
        out.append(now[len(before):] if now.startswith(before) else decode(ids[start : i + 1]))
        start = i + 1
    return out


def groups(rows: list[list[int]], budget: int) -> list[range]:
    """Consecutive rows in groups of at most `budget` tokens (a longer row alone)."""
    out, start, size = [], 0, 0
    for i, r in enumerate(rows):
        if i > start and size + len(r) > budget:
            out.append(range(start, i))
            start, size = i, 0
        size += len(r)
    return out + [range(start, len(rows))] if rows else out


async def score_prompts(engine: Engine, rows: list[list[int]], routes: list[Route], top: int) -> list[list[TokenLogprob | None]]:
    """Every prompt token's logprob under its row's route, scored between two engine steps.

    Rows go in groups of at most the engine's prefill budget, one job each, so a request
    echoing long prompts never holds the decoding of everyone else for more than a prefill."""
    engine.start()  # idempotent: scoring runs on the loop's thread
    out: list[list[TokenLogprob | None]] = []
    for g in groups(rows, engine.max_prefill_tokens):
        part, part_routes = [rows[i] for i in g], [routes[i] for i in g]
        try:
            out += await asyncio.wrap_future(engine.run_between_steps(
                lambda part=part, part_routes=part_routes: prompt_logprobs(engine, part, part_routes, top)))
        except LorastackError as e:
            raise from_lorastack(e, "model") from e
    return out


def generated(req: EngineRequest, eos: int) -> tuple[list[int], list[TokenLogprob]]:
    """The ids whose logprobs `req` recorded: its tokens, plus EOS when that ended it."""
    ids = list(req.tokens)
    if len(req.logprobs) > len(ids):
        ids.append(eos)
    return ids, list(req.logprobs[: len(ids)])


def _in_text(pieces: list[str], entries: list[TokenLogprob], text_len: int) -> list[tuple[str, TokenLogprob]]:
    """The generated (piece, logprob) pairs up to where the returned text ends: a stop string
    cuts the text, and the tokens past it are not reported either (an ending EOS, whose
    piece is "", stays)."""
    kept, at = [], 0
    for piece, e in zip(pieces, entries):
        if at >= text_len and piece:
            break
        kept.append((piece, e))
        at += len(piece)
    return kept


def _top(tokenizer, entry: TokenLogprob) -> dict[str, float]:
    """Alternatives by token text; the chosen token is always in it (vLLM's convention), so
    a reader can tell whether it was the most likely one."""
    names = [(tokenizer.decode([t], skip_special_tokens=False), v) for t, v in entry.top]
    top = {name: v for name, v in reversed(names)}  # the best wins a clash of equal texts
    chosen = tokenizer.decode([entry.token], skip_special_tokens=False)
    top.setdefault(chosen, entry.logprob)
    return top


def completion(tokenizer, prompt: tuple[list[int], list[TokenLogprob | None]] | None,
               gen_ids: list[int], gen_lps: list[TokenLogprob], gen_text_len: int) -> CompletionLogprobs:
    """One completions choice's `logprobs`: the echoed prompt's tokens (when `prompt` is given)
    then the generated ones, cut where the choice's text ends (a stop string)."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if prompt is not None:
        ids, entries = prompt
        tokens += token_strings(tokenizer, ids, skip_special=False)
        for e in entries:
            lps.append(None if e is None else e.logprob)
            tops.append(None if e is None else _top(tokenizer, e))
    offsets, at = [], 0
    for piece in tokens:
        offsets.append(at)
        at += len(piece)
    for piece, e in _in_text(token_strings(tokenizer, gen_ids, skip_special=True), gen_lps, gen_text_len):
        offsets.append(at)
        at += len(piece)
        tokens.append(piece)
        lps.append(e.logprob)
        tops.append(_top(tokenizer, e))
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def chat(tokenizer, req: EngineRequest, eos: int, top: int) -> ChatLogprobs:
    """One chat choice's `logprobs.content`: each generated token with its `top` alternatives."""
    ids, entries = generated(req, eos)
    content = []
    for piece, e in _in_text(token_strings(tokenizer, ids, skip_special=True), entries, len(req.text)):
        alts = [TopLogprob(token=s, logprob=v, bytes=list(s.encode()))
                for s, v in ((tokenizer.decode([t], skip_special_tokens=False), v) for t, v in e.top[:top])]
        content.append(ChatTokenLogprob(token=piece, logprob=e.logprob, bytes=list(piece.encode()), top_logprobs=alts))
    return ChatLogprobs(content=content)


def check_logprobs_route(body: ChatCompletionRequest | CompletionRequest, stack: bool) -> None:
    """Logprobs and prompt scoring need one route per row; a stack's answer comes from
    several stages, so there it is a 400 naming the field."""
    if not stack:
        return
    if body.logprob_count() is not None:
        raise ApiError(400, "logprobs are not available for stack/ models (their answer comes from several stages)",
                       param="logprobs", code="unsupported_parameter")
    if isinstance(body, CompletionRequest) and body.scores_only:
        raise ApiError(400, "max_tokens=0 (scoring the prompt) is not available for stack/ models", param="max_tokens",
                       code="unsupported_parameter")


def chat_choice_logprobs(base, body: ChatCompletionRequest, req: EngineRequest) -> ChatLogprobs | None:
    """`logprobs` of one chat choice; None when the request did not ask."""
    top = body.logprob_count()
    return None if top is None else chat(base.tokenizer, req, base.eos_token_id, top)


async def completion_choices(engine: Engine, base, body: CompletionRequest, prompts: list[str], all_ids: list[list[int]],
                             routes: list[Route], reqs: list[EngineRequest]) -> list[CompletionChoice]:
    """The choices of a completions response: `n` per prompt, in OpenAI's order, each with
    its echo and logprobs as asked. With max_tokens=0 (`scores_only`) nothing was generated
    and each choice is its prompt alone, as lm-eval's loglikelihood requests want."""
    top = body.logprob_count()
    n = body.n
    scored = None
    if body.echo and top is not None:
        if reqs:  # the route each prompt was actually answered under (a routed request may have been re-routed)
            routes = [reqs[i * n].route for i in range(len(prompts))]
        scored = await score_prompts(engine, all_ids, routes, top)
    if not reqs:  # scoring only: no engine request counted the prompt tokens
        note_tokens(sum(len(ids) for ids in all_ids), 0)
    choices = []
    for i in range(len(prompts) * n):
        p = i // n
        req = reqs[i] if reqs else None
        text = (prompts[p] if body.echo else "") + (req.text if req else "")
        lp = None
        if top is not None:
            gen_ids, gen_lps = generated(req, base.eos_token_id) if req else ([], [])
            lp = completion(base.tokenizer, (all_ids[p], scored[p]) if scored else None, gen_ids, gen_lps,
                            len(req.text) if req else 0)
        finish = "length" if req is None or req.finish_reason == "length" else "stop"
        choices.append(CompletionChoice(index=i, text=text, finish_reason=finish, logprobs=lp))
    return choices
