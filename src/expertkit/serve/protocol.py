"""The OpenAI request shapes the server accepts, and its error shape.

Fields of the OpenAI API that we do not implement are accepted only at their neutral value
(e.g. presence_penalty 0), so a client never silently gets something other than it asked
for; fields that are not in the API at all are refused (400).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 16
MAX_PROMPTS = 128  # prompts in one completions request
MAX_TOP_LOGPROBS = 20


class OpenAIError(Exception):
    """Answered as {"error": {...}} with this HTTP status (the shape OpenAI clients parse)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class MixMember(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    weight: float = Field(ge=0.0, allow_inf_nan=False)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="one choice per prompt (n > 1 is not supported)")
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Union[str, list[str], None] = Field(default=None, validate_default=True)
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    logit_bias: Optional[dict] = None
    user: Optional[str] = Field(default=None, max_length=256)
    ignore_eos: bool = Field(default=False, description="vLLM's extension: keep going past end-of-text "
                                                        "(exactly max_tokens new tokens, for load tests)")
    # expertkit's extensions: a collaboration's parameters for this request (proxy/fusion: alpha;
    # defer: entropy threshold; card: relevance threshold); refused (400) by a model that takes none
    alpha: Optional[float] = Field(default=None, description="proxy/fusion: strength of the small expert's shift")
    threshold: Optional[float] = Field(default=None, description="defer/card: the strategy's threshold")
    token_map: Optional[Literal["text", "vocab"]] = Field(default=None, description="collaborations across two "
                                                          "vocabularies: align by text or by shared token strings")
    # a weighted mix of served adapters for this request; the same as model "mix:a=0.7,b=0.3"
    adapters: Optional[list[MixMember]] = Field(default=None, min_length=1, max_length=16)

    @property
    def model_name(self) -> str:
        """The model this request asks for: `model`, or the mix its `adapters` field spells."""
        if self.adapters is None:
            return self.model
        return "mix:" + ",".join(f"{m.name}={m.weight!r}" for m in self.adapters)

    @property
    def composition_params(self) -> dict:
        given = (("alpha", self.alpha), ("threshold", self.threshold), ("token_map", self.token_map))
        return {k: v for k, v in given if v is not None}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(s) > 256 for s in stops):
            raise ValueError("stop strings are at most 256 characters")
        return tuple(s for s in stops if s)

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return None

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and set(v) - {"include_usage"}:
            raise ValueError("stream_options supports only include_usage")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = Field(default=None, ge=1, le=1, description="not supported beyond 1")
    suffix: Optional[str] = Field(default=None, max_length=0, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt is an empty list")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("a token-id prompt is empty")
        if isinstance(v, list) and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt of the request: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = Field(default=None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def as_dicts(self) -> list[dict]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: a `prompt`, or chat `messages` rendered by the model's chat template."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = Field(default=None, max_length=256)
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(default=None, min_length=1)
    add_special_tokens: Optional[bool] = Field(default=None, description="default: true for a prompt, false for "
                                                                         "messages (the template writes them)")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = Field(default=None, max_length=256)
    tokens: list[int]
