"""Tools and function calling on chat completions: what a request's `tools` and `tool_choice` ask for, the
grammar that makes the answer a call, and the call read back out of the generated text, whole or as it grows.

A named function (or `required` with one tool) constrains the output to be exactly the arguments object, by
the tool's `parameters` schema; `required` with several tools to `{"name": <one of them>, "arguments":
{...by that tool's schema}}`. Either way the call is exact on any model: the grammar engine, not the chat
template, decides its shape. `auto` would need the model to choose between text and a call in its own format,
so it is refused with a 400 that says why; `none` answers in text, with the tools left out of the prompt.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from app.api.errors import APIError
from app.api.grammar_price import GrammarLimits, check_price
from app.api.openai_schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # a tool without parameters

# `required` with several tools: the text up to the arguments object ({"name": "...", "arguments": ), read once
# the object has started (the lookahead), so the whitespace before it is never taken for part of it
ARGUMENTS_START = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


def parameters(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


@dataclass(frozen=True)
class ToolCalling:
    """A request whose answer is a tool call. name: the function called (a named function, or `required` with
    one tool), None when the output names one of `tools`."""
    name: str | None
    tools: list[Tool]

    @property
    def called(self) -> list[tuple[int, Tool]]:
        """The tools the output may call, with their index in `tools`."""
        return [(i, t) for i, t in enumerate(self.tools) if self.name in (None, t.function.name)]

    @property
    def grammar_request(self) -> tuple[str, str, dict]:
        """(field, kind, source) of the output's grammar, as OpenAIRequest.grammar_requests gives them."""
        if self.name is not None:
            return "tools", "json_schema", parameters(self.called[0][1])
        return "tools", "json_schema", {"anyOf": [
            {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": parameters(t)},
             "required": ["name", "arguments"], "additionalProperties": False} for _, t in self.called]}

    def check_prices(self, limits: GrammarLimits) -> None:
        """Each callable tool's schema within the grammar limits (a 400 naming it), then their grammar."""
        for i, tool in self.called:
            check_price(f"tools.{i}.function.parameters", "json_schema", parameters(tool), limits)
        check_price(*self.grammar_request, limits)

    def reader(self) -> ToolCallReader:
        return ToolCallReader(self.name)


def tool_calling(body: ChatCompletionRequest, template_has_tools: bool) -> ToolCalling | None:
    """What the request's tools ask for: None for a text answer (no tools, or tool_choice 'none'); a 400
    naming tool_choice for 'auto', also the default when tools are given."""
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return None
    if choice in (None, "auto"):
        why = ("this model's chat template has no tool calling" if not template_has_tools else
               "softserve does not read tool calls out of a model's free text")
        raise APIError(400, f"tool_choice: 'auto' (the default when tools are given) cannot be honoured: {why}. "
                            "Ask for a call with tool_choice 'required' or {\"type\": \"function\", \"function\": "
                            "{\"name\": ...}}, which constrain the output to the tool's schema on any model, or "
                            "answer in text with 'none'", "unsupported_field", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        return ToolCalling(choice.function.name, body.tools)
    return ToolCalling(body.tools[0].function.name if len(body.tools) == 1 else None, body.tools)


def template_tools(body: ChatCompletionRequest, template_has_tools: bool) -> list[dict] | None:
    """The tools as the chat template takes them, when it takes them and they are offered (not 'none')."""
    if not template_has_tools or not body.tools or body.tool_choice == "none":
        return None
    return [tool.model_dump(exclude_none=True) for tool in body.tools]


def check_history(messages: list[ChatMessage], template_has_tools: bool) -> None:
    """Earlier tool calls can only be rendered by a chat template that knows them; else a 400 naming one."""
    if template_has_tools:
        return
    for i, message in enumerate(messages):
        if message.tool_calls:
            raise APIError(400, f"messages.{i}.tool_calls: this model's chat template has no tool calling, so it "
                                "cannot render an assistant message's tool calls", "chat_template",
                           f"messages.{i}.tool_calls")


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallReader:
    """One choice's tool call, read from its text as it grows (whole at once, or a stream's pieces): the
    function's name and the arguments object's own text, exactly as generated, so a stream's fragments add
    up to the whole answer's arguments. The grammar guarantees the shape; the text may be cut short
    (max_tokens, a stop string), and then the arguments are what came."""

    def __init__(self, name: str | None):
        self.id = call_id()
        self.name = name  # known up front, or read from the text (`required` with several tools)
        self.text = ""
        self.start = 0 if name is not None else None  # where the arguments object starts in the text
        self.end: int | None = None  # where it ends, once closed
        self.sent = 0  # arguments characters handed out
        self._depth, self._in_string, self._escaped, self._scanned = 0, False, False, 0

    @property
    def complete(self) -> bool:
        return self.end is not None

    @property
    def arguments(self) -> str:
        return self.text[self.start:self.end] if self.start is not None else ""

    def feed(self, text: str) -> str:
        """Add generated text; return the arguments text it adds (may be empty)."""
        self.text += text
        if self.start is None:
            found = ARGUMENTS_START.match(self.text)
            if found is None:
                return ""
            self.name, self.start = json.loads(found.group(1)), found.end()
        self._scan()
        arguments = self.arguments
        fragment = arguments[self.sent:]
        self.sent = len(arguments)
        return fragment

    def _scan(self) -> None:
        """Follow the arguments' nesting (outside strings) to the character that closes the object."""
        i = max(self._scanned, self.start)
        while self.end is None and i < len(self.text):
            ch = self.text[i]
            if self._escaped:
                self._escaped = False
            elif self._in_string:
                self._escaped, self._in_string = ch == "\\", ch != '"'
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.end = i + 1
            i += 1
        self._scanned = i
