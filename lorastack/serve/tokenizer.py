"""vLLM's tokenizer endpoints: `/tokenize`, `/detokenize`, `/tokenizer_info`.

Clients that count or split tokens themselves need the server's own tokenizer. lm-eval's
`local-completions` looks for exactly these endpoints and, when they answer, tokenizes
through them (`tokenizer_backend=remote`, its default when they exist), so it runs against
this server with no local copy of the tokenizer and no hub download.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .errors import ApiError
from .prompts import check_ids
from .schemas import DetokenizeRequest, TokenizeRequest


def install_tokenizer_routes(app: FastAPI, runtime, dependencies: list[Any]) -> None:
    base = runtime.base
    tok = base.tokenizer

    @app.post("/tokenize", dependencies=dependencies)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """Token ids of `prompt` (or of `messages` after the chat template)."""
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        try:
            if body.messages is not None:
                # The same rendering chat requests get (Base.render), so the ids match what the model sees.
                msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
                text = base.render(msgs, add_generation_prompt=body.add_generation_prompt)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        except Exception as e:  # noqa: BLE001 - e.g. unpaired surrogates, a template that rejects the conversation
            raise ApiError(400, f"cannot tokenize this input ({type(e).__name__})",
                           param="messages" if body.messages is not None else "prompt") from e
        return {"count": len(ids), "max_model_len": runtime.context_length(), "tokens": ids}

    @app.post("/detokenize", dependencies=dependencies)
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        ids = check_ids(body.tokens, tok, "tokens")
        return {"prompt": tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)}

    @app.get("/tokenizer_info", dependencies=dependencies)
    async def tokenizer_info() -> dict[str, Any]:
        """What a client needs to tokenize like the server: special tokens and chat template."""
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
                "model_max_length": runtime.context_length(), "vocab_size": len(tok)}
