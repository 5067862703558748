"""Request bodies of the OpenAI routes. Every field OpenAI defines is here: honoured, or refused with a 400
naming it when it asks for something softserve does not do; a field OpenAI does not define is refused too
(`extra="forbid"`), unless it is one of the vLLM extensions listed in docs/API.md.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from app.api.sampling_fields import MaxTokens, OpenAISamplingFields, TokenId
from app.api.schemas import Usage
from prompt_store.format import BASE_MODEL

MAX_N = 16


def Refused(reason: str, *allowed) -> Any:
    """A field accepted only when absent, null or one of `allowed` (values that ask for nothing softserve
    lacks); any other value is a 400 naming the field."""
    def check(value):
        if value is None or any(value == a for a in allowed):
            return value
        raise PydanticCustomError("unsupported_field", reason)
    allowed_text = f" (accepted: {', '.join(map(repr, allowed))})" if allowed else ""
    return Annotated[Any, AfterValidator(check), Field(description=f"refused: {reason}{allowed_text}")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="a last chunk with `choices: []` and the request's usage "
                                                   "(`usage: null` on the chunks before it)")
    continuous_usage_stats: bool = Field(False, description="(vLLM) usage so far on every chunk")


class JsonSchema(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema", description="the JSON Schema the output follows")
    strict: bool | None = Field(None, description="always strict: the output always validates")


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.json_schema is not None) != (self.type == "json_schema"):
            raise PydanticCustomError("unsupported_field", "type 'json_schema' goes with a json_schema, and only it")
        return self


class OpenAIRequest(OpenAISamplingFields, Strict):
    """What chat and text completions share (and the sampling fields, app/api/sampling_fields.py)."""
    model: str = Field(BASE_MODEL, description="'base', the base model's id, or a generate prompt (`name` or "
                                               "`name@version`)")
    max_tokens: MaxTokens | None = Field(None, description="tokens to generate at most; default: the rest of the "
                                                           "context")
    max_completion_tokens: MaxTokens | None = Field(None, description="the same as max_tokens")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = Field(False, description="send Server-Sent Events chunks, then `data: [DONE]`")
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrained output")
    user: str | None = Field(None, max_length=256, description="an end-user id: under a traffic split, every "
                             "request of one user gets the same version (not stored or logged)")
    # vLLM's extensions
    guided_json: dict | None = Field(None, description="(vLLM) a JSON Schema the output follows")
    guided_regex: str | None = Field(None, min_length=1, description="(vLLM) a regex the output matches")
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = Field(
        None, description="(vLLM) the output is exactly one of these strings")
    # OpenAI fields for what softserve does not do
    store: Refused("storing completions is not supported", False) = None
    metadata: Refused("metadata goes with store, which is not supported") = None
    service_tier: Refused("only service_tier 'auto' or 'default' is supported", "auto", "default") = None

    @field_validator("stream_options")
    @classmethod
    def _only_streams(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("unsupported_field", "stream_options goes with stream: true")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, value, info: ValidationInfo):
        other = info.data.get("max_tokens")
        if value is not None and other is not None and other != value:
            raise PydanticCustomError("unsupported_field", "max_tokens and max_completion_tokens differ; send one")
        return value

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def grammar_requests(self) -> list[tuple[str, str, Any]]:
        asked = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked.append(("response_format", "json_object", None))
        elif fmt is not None and fmt.type == "json_schema":
            asked.append(("response_format", "json_schema", fmt.json_schema.schema_))
        for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice")):
            if getattr(self, name) is not None:
                asked.append((name, kind, getattr(self, name)))
        return asked


class ContentPart(Strict):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class FunctionCall(Strict):
    name: str = Field(max_length=64)
    arguments: str = Field(description="the arguments as a JSON object, in a string (as OpenAI sends them)")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise PydanticCustomError("validation_error", "arguments is a JSON object in a string")
        return value


class ToolCall(Strict):
    id: str = Field(max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="'developer' is rendered as 'system'")
    content: str | list[ContentPart] | None = Field(
        None, description="text, or a list of text parts (joined); only an assistant message with tool_calls may "
                          "leave it out")
    name: str | None = Field(None, max_length=64, description="passed to the chat template")
    tool_call_id: str | None = Field(None, description="(tool messages) passed to the chat template")
    tool_calls: list[ToolCall] | None = Field(
        None, description="(assistant messages) the calls it made, passed to the chat template (which must "
                          "support tools)")
    function_call: Refused("function calls are not supported") = None
    refusal: Refused("refusal messages are not supported") = None
    audio: Refused("audio is not supported") = None

    @field_validator("tool_calls")
    @classmethod
    def _only_assistants_call(cls, value, info: ValidationInfo):
        if value and info.data.get("role") != "assistant":
            raise PydanticCustomError("unsupported_field", "only assistant messages have tool_calls")
        return value

    @model_validator(mode="after")
    def _content_unless_calls(self):
        if self.content is None and not self.tool_calls:
            raise PydanticCustomError("validation_error", "content is required (but for an assistant message "
                                                          "with tool_calls)")
        return self

    def as_template_input(self) -> dict:
        """The message as chat templates take it; tool calls' arguments as objects (HF's convention)."""
        text = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        data = {"role": "system" if self.role == "developer" else self.role, "content": text}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.tool_calls:
            data["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        return data


TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128  # OpenAI's limit


class FunctionDefinition(Strict):
    name: str = Field(pattern=TOOL_NAME, description="a-z, A-Z, 0-9, _ and -, at most 64")
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON Schema of `type: object`, the arguments; none: no "
                                                      "arguments")
    strict: bool | None = Field(None, description="always strict: the arguments always validate")

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, value):
        if value is not None and value.get("type") != "object":
            raise PydanticCustomError("validation_error", "parameters is a JSON Schema of type 'object'")
        return value


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


def _choice_kind(value) -> str | None:
    """tool_choice's member by the value's type; the tags are type names, which error paths leave out."""
    return "str" if isinstance(value, str) else "dict" if isinstance(value, (dict, NamedToolChoice)) else None


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("str")] | Annotated[NamedToolChoice, Tag("dict")],
    Discriminator(_choice_kind, custom_error_type="validation_error", custom_error_message=(
        "tool_choice is 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"))]


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, rendered with the chat template")
    logprobs: bool = Field(False, description="return the chosen tokens' log-probabilities")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and this many alternatives per token")
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="functions the model may call (names unique)")
    tool_choice: ToolChoice | None = Field(
        None, description="a named function or 'required': a call constrained to the tool's schema; 'none': no "
                          "call; 'auto' (the default with tools) is refused: see docs/API.md")
    parallel_tool_calls: bool | None = Field(None, description="a choice makes at most one call either way")
    functions: Refused("functions are not supported", []) = None
    function_call: Refused("function calls are not supported", "none") = None
    audio: Refused("audio output is not supported") = None
    modalities: Refused("only the text modality is supported", ["text"]) = None
    prediction: Refused("predicted outputs are not supported") = None
    reasoning_effort: Refused("reasoning effort is not supported") = None
    verbosity: Refused("verbosity is not supported") = None
    web_search_options: Refused("web search is not supported") = None
    prompt_cache_key: Refused("prompt_cache_key is not supported (prefix caching is automatic)") = None
    safety_identifier: Refused("safety_identifier is not supported") = None

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value):
        names = [tool.function.name for tool in value or []]
        for name in names:
            if names.count(name) > 1:
                raise PydanticCustomError("validation_error", "tool names must be unique ('{name}' is twice)",
                                          {"name": name})
        return value

    @field_validator("tool_choice")
    @classmethod
    def _a_tool_to_choose(cls, value, info: ValidationInfo):
        names = [tool.function.name for tool in info.data.get("tools") or []]
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise PydanticCustomError("validation_error", "names no function in tools ('{name}')",
                                      {"name": value.function.name})
        if value in ("auto", "required") and not names:
            raise PydanticCustomError("validation_error", "'{value}' goes with tools", {"value": value})
        return value


PromptText = Annotated[str, Field(min_length=1)]
PromptIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(OpenAIRequest):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1)] | PromptIds | \
        Annotated[list[PromptIds], Field(min_length=1)] = Field(
            description="a text, a list of texts, a list of token ids, or a list of token-id lists; each prompt "
                        "gets `n` choices")
    logprobs: int | None = Field(None, ge=0, le=20,
                                 description="log-probabilities of the chosen token and this many alternatives")
    echo: bool = Field(False, description="the prompt before the completion (with logprobs: the prompt's too)")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only equal to n (no server-side ranking)")
    suffix: Refused("suffix (insertion) is not supported") = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value, info: ValidationInfo):
        if value is not None and value != info.data.get("n", 1):
            raise PydanticCustomError("unsupported_field", "best_of other than n is not supported")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# ---- responses (a stream's chunks are built as JSON text, in these shapes) --------------------------------

class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments object's JSON text, as generated")


class ResponseToolCall(BaseModel):
    id: str = Field(description="call_ and 24 random hex digits")
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is a tool call")
    tool_calls: list[ResponseToolCall] | None = Field(None, exclude_if=lambda calls: calls is None,
                                                      description="with tools: the call made (absent without)")


class ChatChoice(BaseModel):
    index: int
    finish_reason: str = Field(description="'stop' (end of sequence, stop string or token, grammar complete), "
                                           "'tool_calls' (a complete tool call) or 'length'")
    logprobs: dict | None = Field(None, description="`content`: per token `token`, `logprob`, `top_logprobs`")
    message: AssistantMessage


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt i's choice j is i * n + j")
    finish_reason: str
    logprobs: dict | None = Field(None, description="`tokens`, `token_logprobs`, `top_logprobs` (with echo the "
                                                    "prompt's tokens first; its first token's logprob is null)")
    text: str = Field(description="with echo: the prompt, then the completion")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="the base model's id")
    parent: str | None = Field(description="prompts: the base model's id")
    max_model_len: int
    task: str
    alias_of: str | None = Field(None, description="`base`: the id it stands for")
    kind: str | None = None
    version: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def streamed(chunk: str) -> dict:
    """OpenAPI `responses` entry of a route that streams Server-Sent Events with `stream: true`."""
    return {200: {"content": {"text/event-stream": {"schema": {
        "type": "string", "description": f"with stream: true, `data: {{{chunk} JSON}}` events, then `data: [DONE]`; "
                                         "with stream_options.include_usage `usage: null` on every chunk but a last "
                                         "one with `choices: []` and the `usage`"}}}}}
