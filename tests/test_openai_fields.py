"""Every field of the OpenAI completions and chat requests, through the official client against one live
server: honoured (exact token counts, stop conditions, n choices, prompt forms, penalties, usage chunks,
echo with the model's own log-probabilities, structured output that validates) or refused with a 400
naming the field."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

openai = pytest.importorskip("openai")

from app.engine.model import DenseAttention  # noqa: E402
from tests.live_server import sse_events, upload  # noqa: E402

MAX_SEQ_LEN = 512
CHAT_PROMPT = Path(__file__).resolve().parents[1] / "examples" / "prompts" / "chat.safetensors"
USER = [{"role": "user", "content": "Say something about the sea."}]


SERVER_SETTINGS = {"SOFTSERVE_MAX_SEQ_LEN": str(MAX_SEQ_LEN), "SOFTSERVE_MAX_INPUTS_PER_REQUEST": "8"}


@pytest.fixture(scope="module", autouse=True)
def chat_prompt(client) -> None:  # server, client (httpx): tests/conftest.py's
    """The example chat prompt, stored once for the module's tests (model="chat")."""
    assert upload(client, "chat", CHAT_PROMPT.read_bytes()).status_code == 201


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# ---- refused ---------------------------------------------------------------------------------------

CHAT = {"messages": USER, "max_tokens": 2}
COMPLETION = {"prompt": "x", "max_tokens": 2}
REFUSED = [
    ("/v1/completions", {**COMPLETION, "suffix": "!"}, "suffix", "unsupported_field"),
    ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of", "unsupported_field"),
    ("/v1/completions", {**COMPLETION, "frobnicate": 1}, "frobnicate", "unknown_field"),
    ("/v1/completions", {**COMPLETION, "store": True}, "store", "unsupported_field"),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options", "unsupported_field"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens",
     "unsupported_field"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"abc": 1}}, "logit_bias", "validation_error"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"99999999": 1}}, "logit_bias", "invalid_token"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [10**9]}, "stop_token_ids", "invalid_token"),
    ("/v1/completions", {**COMPLETION, "prompt": [[1, 2], [10**9]]}, "prompt.1", "invalid_token"),
    ("/v1/completions", {**COMPLETION, "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice",
     "unsupported_field"),
    ("/v1/completions", {**COMPLETION, "guided_regex": "(unclosed"}, "guided_regex", "invalid_grammar"),
    # tools without tool_choice: 'auto', which the default model's template cannot honour (test_openai_tools.py)
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice",
     "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice", "validation_error"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "function_call": "auto"}, "function_call", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "prediction": {"type": "content", "content": "x"}}, "prediction",
     "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, "reasoning_effort", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "web_search_options": {}}, "web_search_options", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "service_tier": "flex"}, "service_tier", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "metadata": {"a": "b"}}, "metadata", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "echo": True}, "echo", "unknown_field"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format",
     "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls", "unsupported_field"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                   "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type", "validation_error"),
]


@pytest.mark.parametrize("route,body,param,code", REFUSED, ids=[f"{r[0]}:{r[2]}" for r in REFUSED])
def test_refused_fields_are_400_naming_the_field(client, route, body, param, code):
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert param.split(".")[0] in error["message"]
    if code is not None:
        assert error["code"] == code, error


def test_accepted_no_op_values(openai_client):
    """Values of refused fields that ask for nothing softserve lacks are accepted."""
    r = openai_client.chat.completions.create(model="base", messages=USER, max_tokens=2, tools=[], tool_choice="none",
                                              store=False, service_tier="auto", extra_body={"modalities": ["text"]})
    assert r.usage.completion_tokens == 2


# ---- lengths and stops -------------------------------------------------------------------------------

def test_max_completion_tokens_both_routes(openai_client):
    chat = openai_client.chat.completions.create(model="base", messages=USER, max_completion_tokens=5, temperature=0)
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
    text = openai_client.completions.create(model="base", prompt="Once upon a time", temperature=0,
                                            extra_body={"max_completion_tokens": 5})
    assert text.usage.completion_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
def test_ignore_eos_gives_exactly_n_tokens_through_both_routes(openai_client, stream):
    """What a benchmark client sends: max_completion_tokens, ignore_eos, stream_options."""
    extra = {"ignore_eos": True}
    opts = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    chat = openai_client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}],
                                                 max_completion_tokens=40, temperature=0.8, extra_body=extra, **opts)
    text = openai_client.completions.create(model="base", prompt="Hi", max_tokens=40, temperature=0.8, extra_body=extra,
                                            **opts)
    for answer in (chat, text):
        usage = list(answer)[-1].usage if stream else answer.usage
        assert usage.completion_tokens == 40


def test_default_max_tokens_is_the_rest_of_the_context(openai_client):
    ids = [28] * (MAX_SEQ_LEN - 24)
    r = openai_client.completions.create(model="base", prompt=ids, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
    chat = openai_client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi!"}],
                                                 temperature=0)
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens > 0  # not cut at 16


def test_stop_strings_stop_token_ids_and_min_tokens(openai_client, tokenizer):
    free = openai_client.completions.create(model="base", prompt="The sea is", max_tokens=12, temperature=0)
    text = free.choices[0].text
    word = text.split()[1]
    for stop in (word, [word, "zzzz"]):
        cut = openai_client.completions.create(model="base", prompt="The sea is", max_tokens=12, temperature=0,
                                               stop=stop)
        assert cut.choices[0].text == text[:text.index(word)] and cut.choices[0].finish_reason == "stop"
    ids = tokenizer.hf.encode("The sea is")
    generated = openai_client.completions.create(model="base", prompt=ids, max_tokens=12, temperature=0, logprobs=0)
    fourth = tokenizer.hf.encode(generated.choices[0].logprobs.tokens[3])[0]
    first_at = next(i for i, t in enumerate(generated.choices[0].logprobs.tokens)
                    if tokenizer.hf.encode(t)[0] == fourth)
    stopped = openai_client.completions.create(model="base", prompt=ids, max_tokens=12, temperature=0,
                                               extra_body={"stop_token_ids": [fourth]})
    assert stopped.usage.completion_tokens == first_at + 1 and stopped.choices[0].finish_reason == "stop"
    held = openai_client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi!"}],
                                                 temperature=0, max_tokens=60, extra_body={"min_tokens": 50})
    assert held.usage.completion_tokens >= 50


def test_developer_role_is_system(openai_client):
    ask = lambda role: openai_client.chat.completions.create(  # noqa: E731
        model="base", temperature=0, max_tokens=10,
        messages=[{"role": role, "content": "Answer in French."}, *USER]).choices[0].message.content
    assert ask("developer") == ask("system")


# ---- prompts and choices -------------------------------------------------------------------------------

def test_prompt_forms_and_choice_indexes(openai_client, tokenizer):
    one = lambda p: openai_client.completions.create(  # noqa: E731
        model="base", prompt=p, max_tokens=6, temperature=0).choices[0].text
    texts = ["The sea is", "Paris is"]
    want = [one(t) for t in texts]
    ids = [tokenizer.hf.encode(t) for t in texts]
    assert one(ids[0]) == want[0]
    for prompt in (texts, ids):
        r = openai_client.completions.create(model="base", prompt=prompt, max_tokens=6, temperature=0, n=2)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert [c.text for c in r.choices] == [want[0], want[0], want[1], want[1]]
        assert r.usage.prompt_tokens == sum(len(i) for i in ids)


def test_n_choices_seeded_sampling(openai_client):
    make = lambda: openai_client.chat.completions.create(  # noqa: E731
        model="chat", messages=USER, n=3, max_tokens=10, seed=7, temperature=1.0, extra_body={"ignore_eos": True})
    first, again = make(), make()
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    assert [c.index for c in first.choices] == [0, 1, 2] and first.usage.completion_tokens == 30


@pytest.mark.parametrize("route", ["chat", "text"])
def test_n_streams_equal_non_streamed(openai_client, route):
    kw = dict(model="base", max_tokens=8, temperature=0, n=2)
    if route == "chat":
        full = openai_client.chat.completions.create(messages=USER, **kw)
        chunks = list(openai_client.chat.completions.create(messages=USER, stream=True, **kw))
        got = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == k) for k in (0, 1)]
        want = [c.message.content for c in full.choices]
    else:
        full = openai_client.completions.create(prompt="The sea is", **kw)
        chunks = list(openai_client.completions.create(prompt="The sea is", stream=True, **kw))
        got = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == k) for k in (0, 1)]
        want = [c.text for c in full.choices]
    assert got == want
    assert all(c.usage is None for c in chunks)  # no stream_options: no usage anywhere


def test_stream_usage_chunk_and_continuous_stats(openai_client):
    chunks = list(openai_client.completions.create(model="base", prompt="Hi", max_tokens=4, temperature=0, n=2,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == 1 and all(c.usage is None for c in chunks[:-1])
    chunks = list(openai_client.completions.create(model="base", prompt="Hi", max_tokens=4, temperature=0, stream=True,
                                                   stream_options={"include_usage": False},
                                                   extra_body={"stream_options": {"continuous_usage_stats": True}}))
    assert [c.usage.completion_tokens for c in chunks] == list(range(1, len(chunks) + 1))


# ---- penalties and bias --------------------------------------------------------------------------------

def test_logit_bias_forces_and_bans_tokens(openai_client, tokenizer):
    token = tokenizer.hf.encode(" sea")[0]
    forced = openai_client.completions.create(model="base", prompt="Hi", max_tokens=5, temperature=0,
                                              logit_bias={str(token): 100}, logprobs=0)
    assert forced.choices[0].text == " sea" * 5
    free = openai_client.completions.create(model="base", prompt="The", max_tokens=1, temperature=0, logprobs=0)
    banned_id = tokenizer.hf.encode(free.choices[0].logprobs.tokens[0])[0]
    banned = openai_client.completions.create(model="base", prompt="The", max_tokens=1, temperature=0, logprobs=0,
                                              logit_bias={str(banned_id): -100})
    assert banned.choices[0].text != free.choices[0].text


def test_greedy_penalties_apply(openai_client):
    """Greedy rows with penalties leave the fast path: repeating text changes under each penalty."""
    prompt = "one two one two one two one two"
    base = openai_client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}):
        got = openai_client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, **extra)
        assert got.choices[0].text != base, extra


# ---- echo and prompt log-probabilities -----------------------------------------------------------------

def test_echo_logprobs_equal_the_models_own(openai_client, default_model, tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.hf.encode(text)
    for _ in range(2):  # the second time the prompt's blocks are cached: they must be computed again
        r = openai_client.completions.create(model="base", prompt=text, max_tokens=1, temperature=0, echo=True,
                                             logprobs=2)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(text)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens[:len(ids)] == [tokenizer.hf.decode([i]) for i in ids]
        with torch.inference_mode():
            model = default_model.model
            hidden = model(torch.arange(len(ids))[None], DenseAttention(), tokens=torch.tensor([ids]))
            want = model.logits(hidden)[0].float().log_softmax(-1)
        expected = [float(want[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-3)
        assert len(lp.tokens) == len(ids) + 1
        for i in range(1, len(ids)):  # the 2 likeliest tokens and the prompt's own, as OpenAI and vLLM give them
            alternatives = want[i - 1].topk(2).indices.tolist() + [ids[i]]
            top = {tokenizer.hf.decode([t]): float(want[i - 1, t]) for t in alternatives}
            assert lp.top_logprobs[i] == pytest.approx(top, abs=1e-3)


def test_logprobs_of_generated_tokens_both_routes(client):
    """The raw JSON: one entry per generated token, that spells the text; greedy picks each step's best."""
    r = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                                           "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp, n = choice["logprobs"], r.json()["usage"]["completion_tokens"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and top[token] == logprob == max(top.values())
        assert logprob <= 0 and all(v <= 0 for v in top.values())
    assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(n)]  # each token's start in the text

    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, "temperature": 0,
                                                "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 2 and (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])
        assert 0 >= top[0]["logprob"] >= top[1]["logprob"]
        assert entry["bytes"] == list(entry["token"].encode()) and top[1]["bytes"] == list(top[1]["token"].encode())

    r = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 1.5,
                                           "seed": 7, "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]  # no alternatives asked for: the sampled token's alone
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]

    without = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "logprobs": False,
                                                      "top_logprobs": 2})
    assert without.status_code == 200 and without.json()["choices"][0]["logprobs"] is None


def test_text_offsets_run_on_through_the_echo_and_across_stream_chunks(client):
    """text_offset counts from the start of the choice's text: past the echoed prompt, and on from chunk to
    chunk of a stream, so a client can place every token in the text it assembled."""
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 1, "echo": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = whole["logprobs"]
    assert lp["token_logprobs"][0] is None and whole["text"].startswith("The capital of France is")
    assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(len(lp["tokens"]))]

    with client.stream("POST", "/v1/completions", json={**body, "echo": False, "stream": True}) as r:
        chunks = [json.loads(e)["choices"][0] for e in sse_events(r) if e != "[DONE]"]
    text, offsets, tokens = "", [], []
    for chunk in chunks:
        if chunk["logprobs"] is not None:
            assert chunk["logprobs"]["text_offset"][0] == len(text)  # where this chunk's text starts
            offsets += chunk["logprobs"]["text_offset"]
            tokens += chunk["logprobs"]["tokens"]
        text += chunk["text"]
    assert offsets == [len("".join(tokens[:j])) for j in range(len(tokens))] and "".join(tokens) == text


def test_echo_without_logprobs_prepends_the_prompt(openai_client):
    plain = openai_client.completions.create(model="base", prompt="The sea is", max_tokens=4, temperature=0)
    echoed = openai_client.completions.create(model="base", prompt="The sea is", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "The sea is" + plain.choices[0].text


# ---- structured output ---------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("model", ["base", "chat"])
def test_json_schema_output_validates(openai_client, model):
    messages = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for temperature in (0, 1.0):
        r = openai_client.chat.completions.create(model=model, messages=messages, response_format=fmt, max_tokens=60,
                                                  temperature=temperature, seed=3)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_and_free_text_share_a_batch(openai_client):
    from concurrent.futures import ThreadPoolExecutor

    free = lambda: openai_client.chat.completions.create(  # noqa: E731
        model="base", messages=USER, max_tokens=8, temperature=0)
    alone = free().choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        shaped = [pool.submit(openai_client.chat.completions.create, model=m, messages=[
            {"role": "user", "content": "Give me a JSON object about the sea."}], max_tokens=40, temperature=0,
            response_format={"type": "json_object"}, extra_body={"ignore_eos": False}) for m in ("base", "chat")]
        free_runs = [pool.submit(free) for _ in range(2)]
        for f in shaped:
            r = f.result()
            if r.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(r.choices[0].message.content), dict)
            else:  # cut by max_tokens: still a valid prefix of an object
                assert r.choices[0].message.content.lstrip().startswith("{")
        assert [f.result().choices[0].message.content for f in free_runs] == [alone, alone]


def test_guided_choice_and_regex(openai_client):
    choice = openai_client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Is water wet?"}], temperature=1.0,
        extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert choice.choices[0].message.content in ("yes", "no", "maybe")
    regex = openai_client.completions.create(model="base", prompt="A phone number:", temperature=1.0, max_tokens=20,
                                             extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
