"""Request and response bodies, shaped like OpenAI's API so existing clients work unchanged.

Unknown request fields are ignored (clients send many we do not use: `user`,
`frequency_penalty`, ...); fields we do use are validated and errors name them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


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


class _Sampling(_Lenient):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
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

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False


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
    # What the decision was made on: the router's confidence for its best candidate
    # against the threshold it had to reach, and which signal produced it.
    candidate: str | None = None
    confidence: float | None = None
    threshold: float | None = None
    signal: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    lorastack: RouteInfo


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


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
