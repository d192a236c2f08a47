"""Request and response bodies, shaped like OpenAI's API so existing clients work unchanged.

Unknown request fields are ignored (clients send many we do not use: `user`,
`frequency_penalty`, ...); fields we do use are validated and errors name them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from pydantic.json_schema import SkipJsonSchema

from ..engine.sampling import MAX_TOP_LOGPROBS


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Keeping(BaseModel):
    """Keeps unknown fields (in `model_extra`) so unsupported ones can be named in a 400."""

    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


# OpenAI parameters this server does not implement. Sent with a value that would change the
# answer, they get a 400 naming them instead of being silently ignored (a client asking for
# logprobs or JSON mode must not get a plain answer it mistakes for one). Neutral values
# (0, false, null, "text", "none", empty) are accepted.
UNSUPPORTED = {
    "response_format": "structured output (response_format) is not supported yet",
    "tools": "tools / function calling are not supported",
    "tool_choice": "tools / function calling are not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "presence_penalty": "presence_penalty is not supported",
    "frequency_penalty": "frequency_penalty is not supported",
    "repetition_penalty": "repetition_penalty is not supported",
    "logit_bias": "logit_bias is not supported",
    "best_of": "best_of is not supported",
    "suffix": "suffix (insertion) is not supported",
    "min_p": "min_p is not supported",
}
NEUTRAL: dict[str, tuple[Any, ...]] = {  # values that ask for nothing (type-exact: True is not 1)
    "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},), "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0), "best_of": (1,), "min_p": (0, 0.0),
    "tools": ([],), "functions": ([],), "logit_bias": ({},), "suffix": ("",),
}


class _Sampling(_Keeping):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what a torch generator accepts
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    # vLLM's extra sampling field: keep generating past EOS (load tests, benchmarks).
    ignore_eos: bool = False
    # lorastack extra field for `auto`: this request's routing operating point (share of
    # generic inputs allowed to reach an adapter; higher routes more, lower abstains more).
    # Kept out of the OpenAPI schema, like other servers' vendor extensions.
    false_route: SkipJsonSchema[float | None] = Field(default=None, ge=0.0, le=1.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def logprob_count(self) -> int | None:
        """Alternatives per token the request asks for; None when it asks for no logprobs."""
        return None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) of the first unsupported parameter sent with a non-neutral value."""
        if self.stream and self.logprob_count() is not None:
            return "logprobs", "logprobs with stream=true are not supported yet (send stream=false)"
        extra = self.model_extra or {}
        for name, why in UNSUPPORTED.items():
            if name not in extra or extra[name] is None or extra[name] is False:
                continue
            if any(extra[name] == v and type(extra[name]) is type(v) for v in NEUTRAL.get(name, ())):
                continue
            return name, why
        return None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        return super().unsupported()


TokenIds = list[StrictInt]


class CompletionRequest(_Sampling):
    # Text, texts, or token ids (lm-eval sends ids, so its context/continuation split is exact).
    prompt: str | list[str] | list[TokenIds] | TokenIds
    echo: bool = False
    # 0 is meaningful here: with echo=true it scores the prompt without generating (lm-eval).
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprob_count(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and self.stream:
            return "max_tokens", "max_tokens=0 (scoring the prompt) cannot stream; send stream=false"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens=0 needs echo=true (it returns the prompt and its logprobs, generating nothing)"
        return super().unsupported()

    @property
    def scores_only(self) -> bool:
        """max_tokens=0: echo the prompt (and its logprobs), generate nothing."""
        return self.max_tokens == 0 and self.max_completion_tokens is None


class EmbeddingRequest(_Lenient):
    """OpenAI's `/v1/embeddings` body (`user` and other extras are ignored)."""

    model: str = Field(min_length=1, max_length=512)
    input: str | list[str] | list[TokenIds] | TokenIds
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: little-endian float32, as the openai client decodes it


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeRequest(_Lenient):
    """vLLM's `/tokenize` body: a text, or a conversation put through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: TokenIds


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RouteInfo(BaseModel):
    """Which expert(s) answered, so clients can see the router's choice."""

    spec: str
    route: list[dict[str, Any]]
    router: str | None = None
    abstained: bool = False
    scores: dict[str, float] = Field(default_factory=dict)
    routing_ms: float = 0.0
    # `stack/<name>` requests: every stage's input, route (and router scores), output and time.
    trace: list[dict[str, Any]] | None = None
    # What the decision was made on: the router's confidence for its best candidate
    # against the threshold it had to reach, and which signal produced it.
    candidate: str | None = None
    confidence: float | None = None
    threshold: float | None = None
    signal: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    lorastack: RouteInfo


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists; a prompt's first token has no logprob (None)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    lorastack: list[RouteInfo]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorastack"
    root: str | None = None
    parent: str | None = None
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImportAdapter(_Lenient):
    path: str = Field(min_length=1, max_length=4096)
    name: str | None = Field(default=None, min_length=1, max_length=128)
    overwrite: bool = False


class LoadLoraAdapter(_Lenient):
    """vLLM's `/v1/load_lora_adapter` body."""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str | None = Field(default=None, max_length=4096)


class UnloadLoraAdapter(_Lenient):
    lora_name: str = Field(min_length=1, max_length=128)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
