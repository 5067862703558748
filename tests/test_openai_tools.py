"""Tools and function calling on /v1/chat/completions, through the official client against a live server: a
named function or `required` gives a tool call whose arguments validate against the tool's schema, streamed
as OpenAI streams calls; `auto` on a model whose chat template has no tools, bad tools and conflicting fields
are 400s naming the field. Also: the call reader on its own, and a chat template that takes tools."""
from __future__ import annotations

import json

import jsonschema
import pytest

openai = pytest.importorskip("openai")

from app.api.openai_schemas import ChatMessage  # noqa: E402
from app.api.tools import ToolCallReader  # noqa: E402
from app.engine.tokenizer import Tokenizer  # noqa: E402
from tests.live_server import sse_events  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"],
        "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name.replace('_', ' ')} somewhere",
                                           "parameters": schema}} for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def openai_client(server):  # server, client (httpx): tests/conftest.py's
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def the_call(response) -> tuple[str, dict]:
    """(name, arguments) of a response's one tool call, checked against OpenAI's shape and the tool's schema."""
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return call.function.name, arguments


def test_named_function_gives_arguments_that_validate(openai_client):
    for temperature in (0, 1.0):
        r = openai_client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                           max_tokens=80, temperature=temperature, seed=5)
        assert the_call(r)[0] == "get_weather"


def test_required_picks_one_of_the_tools(openai_client):
    names = set()
    for seed in range(4):
        r = openai_client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=80, temperature=1.0, seed=seed, parallel_tool_calls=False)
        names.add(the_call(r)[0])
    assert names <= set(SCHEMAS)


def test_a_tool_without_parameters_takes_no_arguments(openai_client):
    tools = [{"type": "function", "function": {"name": "ping"}}]
    r = openai_client.chat.completions.create(model="base", messages=ASK, tools=tools, tool_choice="required",
                                       max_tokens=20, temperature=1.0, seed=1)
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {}


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_streamed_call_equals_the_whole_answer(openai_client, tool_choice):
    ask = dict(model="base", messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=80, temperature=0)
    whole = openai_client.chat.completions.create(**ask)
    name, _ = the_call(whole)
    chunks = list(openai_client.chat.completions.create(**ask, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and all(d.content is None for d in deltas)
    calls = [call for d in deltas for call in d.tool_calls or []]
    opening, rest = calls[0], calls[1:]
    assert opening.index == 0 and opening.id.startswith("call_") and opening.type == "function"
    assert opening.function.name == name and opening.function.arguments == ""
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in rest)
    assert "".join(c.function.arguments for c in rest) == whole.choices[0].message.tool_calls[0].function.arguments
    assert len(rest) > 1  # the arguments come as they are generated
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"


def test_a_call_cut_by_max_tokens_says_length(openai_client):
    r = openai_client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=3,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    assert choice.message.tool_calls[0].function.arguments.startswith("{")


def test_tool_choice_none_answers_in_text(openai_client):
    r = openai_client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=5,
                                       temperature=0)
    plain = openai_client.chat.completions.create(model="base", messages=ASK, max_tokens=5, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == plain.choices[0].message.content


def test_auto_is_refused_naming_tool_choice_and_why(openai_client):
    for extra in ({}, {"tool_choice": "auto"}):  # no tool_choice with tools is OpenAI's 'auto'
        with pytest.raises(openai.BadRequestError) as refused:
            openai_client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, max_tokens=5, **extra)
        error = refused.value.body
        assert error["param"] == "tool_choice" and "chat template has no tool calling" in error["message"]
        assert "'required'" in error["message"]


def tool(name="f", **function):
    return {"type": "function", "function": {"name": name, **function}}


MANY_VALUES = {"type": "object", "properties": {"x": {"enum": [f"v{i}" for i in range(2000)]}}}
REFUSED = [
    ({"tools": [tool(), tool()], "tool_choice": "required"}, "tools", "validation_error"),
    ({"tools": [tool("no spaces")], "tool_choice": "required"}, "tools.0.function.name", "validation_error"),
    ({"tools": [tool("x" * 65)], "tool_choice": "required"}, "tools.0.function.name", "validation_error"),
    ({"tools": [tool(), tool("g", parameters=MANY_VALUES)], "tool_choice": "required"},
     "tools.1.function.parameters", "grammar_too_large"),
    ({"tools": [tool(parameters={"type": "string"})], "tool_choice": "required"}, "tools.0.function.parameters",
     "validation_error"),
    ({"tools": [tool(parameters={"type": "object", "properties": {"a": {"type": "nonsense"}}})],
      "tool_choice": "required"}, "tools", "invalid_grammar"),
    ({"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
     "validation_error"),
    ({"tool_choice": "required"}, "tool_choice", "validation_error"),
    ({"tools": [tool()], "tool_choice": "sometimes"}, "tool_choice", "validation_error"),
    ({"tools": [tool()], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "unsupported_field"),
    ({"tools": [tool()], "tool_choice": "required", "guided_regex": "a"}, "guided_regex", "unsupported_field"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}], "tool_choice": "required"}, "tools.0.type",
     "validation_error"),
]


@pytest.mark.parametrize("body,param,code", REFUSED, ids=[f"{r[1]}:{r[2]}" for r in REFUSED])
def test_bad_tools_are_400_naming_the_field(client, body, param, code):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code, error
    assert param.split(".")[0] in error["message"]


def test_tool_results_in_the_history(openai_client):
    called = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}
    r = openai_client.chat.completions.create(model="base", messages=ASK + [result], tools=TOOLS, tool_choice="none",
                                       max_tokens=5)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    # the default model's template cannot render an earlier call: refused, naming it
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(model="base", messages=ASK + [called, result], tools=TOOLS,
                                       tool_choice="none", max_tokens=5)
    assert refused.value.body["param"] == "messages.1.tool_calls"
    assert "chat template has no tool calling" in refused.value.body["message"]


def test_what_langchain_function_calling_sends(client):
    """The body langchain-openai 1.8 sends for with_structured_output(Person, method="function_calling"), as
    captured from it: the pydantic schema as the one tool, named in tool_choice, parallel_tool_calls false;
    it reads the call's arguments back (streamed too: the same body with stream true)."""
    person = {"properties": {"name": {"description": "their name", "maxLength": 20, "type": "string"},
                             "age": {"description": "their age", "maximum": 130, "minimum": 0, "type": "integer"}},
              "required": ["name", "age"], "type": "object"}
    body = {"model": "base", "stream": False,
            "messages": [{"content": "Ada Lovelace is 36 years old.", "role": "user"}],
            "max_completion_tokens": 60, "parallel_tool_calls": False, "temperature": 0.7,
            "tool_choice": {"type": "function", "function": {"name": "Person"}},
            "tools": [{"type": "function", "function": {"name": "Person", "description": "A person.",
                                                        "parameters": person}}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    [call] = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "Person"
    jsonschema.validate(json.loads(call["function"]["arguments"]), person)


def test_streamed_n_choices_have_their_own_calls(client):
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 60, "temperature": 1.0, "seed": 2,
            "n": 2, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [json.loads(e) for e in sse_events(r) if e != "[DONE]"]
    ids, arguments = {}, {0: "", 1: ""}
    for event in events:
        [choice] = event["choices"]
        for call in choice["delta"].get("tool_calls", []):
            if "id" in call:
                ids[choice["index"]] = call["id"]
            arguments[choice["index"]] += call["function"]["arguments"]
    assert len(set(ids.values())) == 2
    for text in arguments.values():
        jsonschema.validate(json.loads(text), WEATHER)


# ---- the call reader and a template that takes tools, without a server ----------------------------------

def test_reader_reads_a_call_whole_or_a_character_at_a_time():
    text = '{"name": "get_time", "arguments": {"zone": "a\\"}{[b", "x": [1, {"y": "\\\\"}]}}'
    whole = ToolCallReader(None)
    whole.feed(text)
    assert whole.name == "get_time" and whole.complete
    assert json.loads(whole.arguments) == {"zone": 'a"}{[b', "x": [1, {"y": "\\"}]}
    pieces = ToolCallReader(None)
    assert "".join(pieces.feed(ch) for ch in text) == whole.arguments and pieces.name == "get_time"
    cut = ToolCallReader("f")
    assert cut.feed('{"a": "}') == '{"a": "}' and not cut.complete


HERMES_LIKE = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
               "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
               "<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
               "{% endfor %}<assistant>")


def test_a_template_that_takes_tools_gets_them_and_earlier_calls(default_model, tmp_path):
    plain = Tokenizer(default_model.directory)
    assert plain.has_chat_template and not plain.has_tools
    plain.hf.chat_template = HERMES_LIKE
    plain.hf.save_pretrained(tmp_path)
    hermes = Tokenizer(tmp_path)
    assert hermes.has_tools
    history = [ChatMessage(role="user", content="Weather?"), ChatMessage(
        role="assistant", tool_calls=[{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}])]
    ids = hermes.apply_chat_template([m.as_template_input() for m in history], tools=TOOLS)
    assert hermes.decode(ids) == ('<tools>get_weather;get_time;</tools><user>Weather?<assistant>'
                                  '<tool_call>get_weather {"city": "Paris", "unit": "celsius"}</tool_call><assistant>')
