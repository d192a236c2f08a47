"""Request and response bodies, shaped like OpenAI's API so existing clients work unchanged.

Unknown request fields are ignored (clients send many we do not use: `user`,
`frequency_penalty`, ...); fields we do use are validated and errors name them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from ..engine.constrain import Constraint
from ..errors import LorastackError
from .errors import ApiError
from ..engine.sampling import MAX_TOP_LOGPROBS


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Keeping(BaseModel):
    """Keeps unknown fields (in `model_extra`) so unsupported ones can be named in a 400."""

    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: str = "text"  # any type parses, so that ChatMessage can name the one it cannot take
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called a function

    @model_validator(mode="after")
    def _text_parts_only(self) -> "ChatMessage":
        """An image or audio part gets one message naming it (a union's schema errors do not)."""
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.type != "text":
                raise ValueError(f"content[{j}] is a {part.type!r} part; the models here read text only (type 'text')")
            if part.text is None:
                raise ValueError(f"content[{j}] has no 'text'")
        return self

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
# (0, false, null, "text", "none", empty) are accepted. response_format, tools and tool_choice
# are read by `structured_output` (the end of this file), which refuses what it cannot do.
UNSUPPORTED = {
    "functions": "legacy function calling is not supported; send tools with tool_choice naming the function",
    "function_call": "legacy function calling is not supported; send tools with tool_choice naming the function",
    "presence_penalty": "presence_penalty is not supported",
    "frequency_penalty": "frequency_penalty is not supported",
    "repetition_penalty": "repetition_penalty is not supported",
    "logit_bias": "logit_bias is not supported",
    "best_of": "best_of is not supported",
    "suffix": "suffix (insertion) is not supported",
    "min_p": "min_p is not supported",
}
NEUTRAL: dict[str, tuple[Any, ...]] = {  # values that ask for nothing (type-exact: True is not 1)
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0), "best_of": (1,), "min_p": (0, 0.0),
    "functions": ([],), "logit_bias": ({},), "suffix": ("",),
}


class _Sampling(_Keeping):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
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
    false_route: SkipJsonSchema[float | None] = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)

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


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


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


# ---------------------------------------------------------------- structured output
# response_format and tools become a decoding constraint (engine/constrain.py): JSON mode, a
# JSON schema, or a forced function call whose arguments follow the function's parameters.


@dataclass(frozen=True)
class Structured:
    """What a request asks its output to be: a constraint, and the function it must call (if any)."""

    constraint: Constraint | None = None
    tool: dict[str, Any] | None = None  # the forced function: {"name", "description", "parameters"}


def structured_output(body: _Sampling, chat: bool) -> Structured:
    """Read response_format / tools / tool_choice; a 400 naming the field for anything not
    enforced (tool_choice "auto" would let the model decide whether to call, which needs a
    tool-call parser this server does not have; a forced function or "none" is exact)."""
    extra = body.model_extra or {}
    constraint = _response_format(extra.get("response_format"))
    tool = _forced_tool(extra.get("tools"), extra.get("tool_choice"), chat)
    if tool is None:
        return Structured(constraint)
    if constraint is not None:
        raise ApiError(400, "send either response_format or a forced tool_choice, not both", param="response_format")
    if body.stream:
        raise ApiError(400, "streaming a forced tool call is not supported; send stream=false", param="stream")
    try:
        constraint = Constraint.json_schema(tool.get("parameters") or {"type": "object", "properties": {}})
    except LorastackError as e:
        raise ApiError(400, f"tools: function {tool['name']!r} parameters: {e}", param="tools") from e
    return Structured(constraint, tool)


def _response_format(fmt: Any) -> Constraint | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object()
    if kind != "json_schema":
        raise ApiError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       param="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, "response_format json_schema: give {\"name\": ..., \"schema\": {...}}", param="response_format")
    if spec.get("schema") is None:
        return Constraint.json_object()  # OpenAI: a json_schema without a schema is any JSON object
    try:
        return Constraint.json_schema(spec["schema"])
    except LorastackError as e:
        raise ApiError(400, f"response_format json_schema: {e}", param="response_format") from e


def _forced_tool(tools: Any, choice: Any, chat: bool) -> dict[str, Any] | None:
    """The function tool_choice forces, or None ("none", or no tools at all)."""
    if not tools and choice in (None, "none", "auto"):
        return None
    if not chat:
        raise ApiError(400, "tools belong to /v1/chat/completions", param="tools" if tools else "tool_choice")
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, "tool_choice needs a non-empty tools list", param="tools")
    functions: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"tools[{i}]: only {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} tools are supported",
                           param="tools")
        functions[fn["name"]] = fn
    if choice == "none":
        return None
    if choice == "required" and len(functions) == 1:
        return next(iter(functions.values()))
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise ApiError(400, f"tool_choice names function {name!r}, which is not in tools ({', '.join(functions)})",
                           param="tool_choice")
        return functions[name]
    said = "no tool_choice (with tools, that means 'auto')" if choice is None else f"tool_choice {json.dumps(choice)}"
    raise ApiError(400, f"{said} is not supported"
                   + ": force a function with {\"type\": \"function\", \"function\": {\"name\": ...}} or send 'none'"
                   + (" ('required' works with a single tool)" if choice == "required" else ""),
                   param="tools" if choice is None else "tool_choice", code="unsupported_parameter")


def chat_messages(messages: list[ChatMessage], tool: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: developer turns are system turns, tool
    results stay "tool" turns, an assistant turn that called functions shows the calls as
    JSON; a forced function is announced in the system turn (the model cannot see `tools`)."""
    out = []
    for m in messages:
        content = m.text()
        if m.role == "assistant" and not content and m.tool_calls:
            content = json.dumps([c.get("function", c) for c in m.tool_calls], ensure_ascii=False)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if tool is not None:
        note = f"Call the function {tool['name']}" + (f" ({tool['description']})" if tool.get("description") else "") \
            + ": reply with its arguments as one JSON object."
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def assistant_message(text: str, structured: Structured) -> AssistantMessage:
    """The reply: plain content, or (a forced function) one tool call whose arguments are the output."""
    if structured.tool is None:
        return AssistantMessage(content=text)
    call = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=ToolCallFunction(name=structured.tool["name"], arguments=text))
    return AssistantMessage(content=None, tool_calls=[call])


def check_stack_sampling(body: "ChatCompletionRequest | CompletionRequest", stack: bool) -> None:
    """A stack's stages keep their own `stop` and `max_tokens` (the spec's): a request that sets
    them gets a 400 naming the field, since answering in full to one that asked for a token, or
    past its stop string, would silently ignore what shapes the answer."""
    if not stack:
        return
    for name in ("stop", "max_tokens", "max_completion_tokens"):
        if getattr(body, name, None) not in (None, []):
            raise ApiError(400, f"{name} is not available for stack/ models (each stage has its own, in the stack's "
                           "spec); leave it out", param=name, code="unsupported_parameter")
