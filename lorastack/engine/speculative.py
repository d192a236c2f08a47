"""Prompt-lookup drafts for speculative decoding (greedy-exact).

Most built-in tasks copy spans of their input (a JSON value, the words to reverse, a name)
and a model's output often repeats itself, so the tokens that followed the last earlier
occurrence of the current n-gram suffix are a cheap guess at what comes next (prompt-lookup
decoding; Saxena 2023, the `prompt_lookup_num_tokens` of Hugging Face and vLLM's `ngram`
proposer). The engine feeds a row's last token plus its draft through one forward pass and
keeps the longest prefix of the draft that greedy decoding would have produced anyway, plus
the model's own next token: the output is the same as decoding one token at a time, only
fewer forward passes are spent on it.

The index is incremental (a dict from n-gram to the end of its latest occurrence), so a
proposal costs a few dict lookups however long the context grows.
"""

from __future__ import annotations

# Longest suffix looked up first. 3 tokens is specific enough on this tokenizer that a hit is
# usually a real copy; down to 1 token still pays at batch 1, where a verify pass of up to 8
# tokens costs about one decode step (the weights are streamed once either way).
MAX_NGRAM = 3
MIN_NGRAM = 1


class PromptLookup:
    """The n-gram index of one request's context (prompt + output so far)."""

    def __init__(self, ids: list[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.ctx: list[int] = []
        # n-gram -> index just past its latest occurrence that has at least one token after it
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(ids)

    def extend(self, tokens: list[int]) -> None:
        """Append tokens to the context (the engine calls it with each row's new output)."""
        for t in tokens:
            self.ctx.append(t)
            end = len(self.ctx) - 1  # n-grams ending here now have a continuation: ctx[end]
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self.index[tuple(self.ctx[end - n : end])] = end

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest
        matching suffix; [] when no suffix occurred before (the row then decodes one token)."""
        if k <= 0:
            return []
        size = len(self.ctx)
        for n in range(min(self.max_ngram, size), self.min_ngram - 1, -1):
            end = self.index.get(tuple(self.ctx[size - n :]))
            if end is not None:
                return self.ctx[end : end + k]
        return []
