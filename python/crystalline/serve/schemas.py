"""The requests the server accepts, as the OpenAI API defines them, and the
plain template that turns chat messages into a prompt for a base model.

Fields are strictly typed (no "5" for 5, no true for 1; integers are fine
where a number is asked); unknown fields are ignored, as most
OpenAI-compatible servers do, except the ones whose answer this server
cannot give (`UNSUPPORTED`), which are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from crystalline import _core

# The most choices (prompts x n) one request may ask for, as OpenAI's n.
MAX_CHOICES = 128
# The most stop strings, as OpenAI.
MAX_STOPS = 4
# Completions' max_tokens when none is given (OpenAI's default), cut to what the context leaves.
DEFAULT_MAX_TOKENS = 16
# Fields whose answer (log probabilities, tool calls, penalties...) this server cannot give.
UNSUPPORTED = ("logprobs", "top_logprobs", "suffix", "best_of", "logit_bias", "tools", "tool_choice", "functions",
               "response_format", "presence_penalty", "frequency_penalty")

# The chat template: each message on a line of its own as "Role: text", then
# "Assistant:" for the model to continue; the reply ends where the model
# starts a new user turn (or at end-of-text, max_tokens or a stop string).
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_REPLY = "Assistant:"
CHAT_STOP = "\nUser:"


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class GenerateRequest(BaseModel):
    """What completions and chat share: sampling, stops, streaming."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # None: the one model served
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # an extension: 0 is off
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in UNSUPPORTED:
                if data.get(name) not in (None, False, 0):
                    raise ValueError(f"{name} is not supported by this server")
        return data

    @field_validator("temperature", "top_p", "top_k")
    @classmethod
    def _sampling(cls, value: float | int, info: ValidationInfo) -> float | int:
        _core.validate_sampling(**{info.field_name: value})  # the Rust sampler's own rule, naming the field
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerateRequest):
    """POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: bool = False

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerateRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name; wins

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def render_chat(messages: list[Message]) -> str:
    """The prompt a base model continues for a conversation:

        System: You answer in Python.
        User: Sort a list.
        Assistant:
    """
    return "".join(f"{CHAT_ROLES[m.role]}: {m.text}\n" for m in messages) + CHAT_REPLY
