"""`/v1/embeddings`: the base's own sentence embeddings, the ones routing uses.

An embedding is the bare base's hidden state after its first `EMBED_LAYERS` layers,
mean-pooled over the input's tokens and scaled to unit length (what the kNN router compares;
OpenAI's embeddings are unit-length too, so cosine similarity is a dot product). No adapter
takes part, so `model` must be `base`. Inputs are capped in number and tokens: each one is
a forward of its own.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi.concurrency import run_in_threadpool

from ..routing.knn import EMBED_LAYERS
from .accesslog import note_model, note_tokens
from .errors import ApiError
from .prompts import as_list, check_ids
from .schemas import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage

MAX_INPUTS = 64  # inputs per request
MAX_TOTAL_TOKENS = 16384  # tokens per request, all inputs together


def input_ids(body: EmbeddingRequest, tokenizer, max_tokens: int) -> list[list[int]]:
    """The request's inputs (text, texts, token ids, lists of them) as token ids, checked."""
    raw = as_list(body.input)
    if not raw or len(raw) > MAX_INPUTS:
        raise ApiError(400, f"input: give a string, token ids, or a list of 1 to {MAX_INPUTS} of them", param="input")
    out = []
    for i, x in enumerate(raw):
        if isinstance(x, str):
            try:
                ids = tokenizer(x, add_special_tokens=False)["input_ids"]
            except Exception as e:  # noqa: BLE001 - e.g. an unpaired surrogate
                raise ApiError(400, f"input[{i}] cannot be tokenized ({type(e).__name__})", param="input") from e
        else:
            ids = check_ids(x, tokenizer, "input", f"input[{i}]")
        if not ids:
            raise ApiError(400, f"input[{i}] is empty", param="input")
        if len(ids) > max_tokens:
            raise ApiError(400, f"input[{i}] is {len(ids)} tokens; at most {max_tokens}", param="input",
                           code="context_length_exceeded")
        out.append(ids)
    total = sum(len(ids) for ids in out)
    if total > MAX_TOTAL_TOKENS:
        raise ApiError(400, f"input is {total} tokens in all; at most {MAX_TOTAL_TOKENS} per request", param="input")
    return out


def embed(runner, rows: list[list[int]]) -> np.ndarray:
    """Unit-length embeddings [rows, hidden] (float32)."""
    e = runner.embed(rows, EMBED_LAYERS).float().numpy()
    return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)).astype(np.float32)


async def create_embeddings(runtime, max_tokens: int, body: EmbeddingRequest) -> EmbeddingList:
    note_model(body.model)
    if body.model != "base":
        raise ApiError(400, f"embeddings come from the base alone (no adapter takes part); use model 'base', not {body.model!r}",
                       param="model")
    runner = getattr(runtime.generator, "runner", None)
    if runner is None:
        raise ApiError(400, "embeddings need the engine (a Llama-family base)", param="model")
    hidden = int(runtime.base.model.config.hidden_size)
    if body.dimensions is not None and body.dimensions != hidden:
        raise ApiError(400, f"dimensions: this base's embeddings have {hidden} dimensions (no shortening)", param="dimensions")
    rows = input_ids(body, runtime.base.tokenizer, min(max_tokens, runtime.context_length()))
    vectors = await run_in_threadpool(embed, runner, rows)
    data = [Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                      else v.tolist()) for i, v in enumerate(vectors)]
    tokens = sum(len(r) for r in rows)
    note_tokens(tokens, 0)
    return EmbeddingList(data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
