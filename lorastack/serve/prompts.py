"""`/v1/completions` prompts: a text, a list of texts, token ids or a list of them, as
OpenAI accepts; every form becomes (text, ids) pairs. Token ids matter to scorers such as
lm-eval, which tokenize context and continuation themselves and need the split kept exact."""

from __future__ import annotations

from ..data import check_text
from ..errors import LorastackError
from .errors import ApiError, from_lorastack
from .schemas import CompletionRequest

MAX_PROMPTS = 16  # prompts per request; each is a row of the batch


def as_list(raw: str | list) -> list:
    """OpenAI's input forms (a text, token ids, or a list of either) as a list of inputs."""
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        return [raw]
    return raw


def check_ids(ids: list[int], tokenizer, param: str, what: str = "") -> list[int]:
    """`ids` if every one is in the vocabulary; a 400 naming `param` otherwise."""
    vocab = len(tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{what or param}: token id {bad} is outside this model's vocabulary (0 to {vocab - 1})", param=param)
    return list(ids)


def completion_prompts(body: CompletionRequest, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The request's prompts as texts and token ids (ids checked against the vocabulary)."""
    raw = as_list(body.prompt)
    if not raw or len(raw) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: give a string, token ids, or a list of 1 to {MAX_PROMPTS} of them", param="prompt")
    if body.stream and len(raw) > 1:
        raise ApiError(400, "streaming takes a single prompt", param="prompt")
    texts, all_ids = [], []
    for p in raw:
        if isinstance(p, str):
            try:
                check_text(p, "prompt")
            except LorastackError as e:
                raise from_lorastack(e, param="prompt") from e
            try:
                ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            except Exception as e:  # noqa: BLE001 - e.g. an unpaired surrogate (\ud800) the tokenizer cannot encode
                raise ApiError(400, f"prompt cannot be tokenized ({type(e).__name__}); is it valid Unicode text?", param="prompt") from e
            texts.append(p)
        else:
            ids = check_ids(p, tokenizer, "prompt")
            texts.append(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        all_ids.append(ids)
    return texts, all_ids
