"""The official `openai` client against a live server: chat and completions, streaming and not, with a prompt."""
from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from tests.live_server import make_prompt_bytes, upload  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def prompts(client, base) -> None:  # server, client (httpx), base: tests/conftest.py's
    """A generate and a tag prompt, stored once for the module's tests."""
    assert upload(client, "helper", make_prompt_bytes(base, "helper", seed=7)).status_code == 201
    assert upload(client, "tagger", make_prompt_bytes(base, "tagger", "tag", labels=["O", "B-X"])).status_code == 201


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_models(openai_client):
    cards = {m.id: m for m in openai_client.models.list()}
    assert {HUB_ID, "base", "helper", "tagger"} <= set(cards)
    assert cards["helper"].parent == HUB_ID and cards["base"].root == HUB_ID and cards[HUB_ID].parent is None
    ask = lambda model: openai_client.completions.create(  # noqa: E731
        model=model, prompt="Hi", max_tokens=4, temperature=0).choices[0].text
    assert ask(HUB_ID) == ask("base")
    assert openai_client.models.retrieve("tagger").id == "tagger"
    with pytest.raises(openai.NotFoundError, match="no model named 'ghost'"):
        openai_client.models.retrieve("ghost")


@pytest.mark.parametrize("model", ["base", "helper"])
def test_chat(openai_client, model):
    messages = [{"role": "user", "content": "Name a color."}]
    full = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant"
    generated = full.usage.completion_tokens  # cut at max_tokens exactly when it says length
    assert 1 <= generated <= 8 and full.choices[0].finish_reason == ("length" if generated == 8 else "stop")
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                   stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


@pytest.mark.parametrize("model", ["base", "helper"])
def test_completions(openai_client, model):
    full = openai_client.completions.create(model=model, prompt="The weather today is", max_tokens=8, temperature=0)
    assert full.object == "text_completion"
    generated = full.usage.completion_tokens
    assert 1 <= generated <= 8 and full.choices[0].finish_reason == ("length" if generated == 8 else "stop")
    chunks = list(openai_client.completions.create(model=model, prompt="The weather today is", max_tokens=8,
                                                   temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_seeded_sampling_repeats(openai_client):
    make = lambda: openai_client.completions.create(  # noqa: E731
        model="helper", prompt="Once", max_tokens=8, temperature=0.9, seed=1234, top_p=0.9).choices[0].text
    assert make() == make()


def test_errors_map_to_client_exceptions(openai_client):
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError, match="tag"):
        openai_client.chat.completions.create(model="tagger", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model="base", prompt="x", max_tokens=100_000)
    assert openai_client.completions.create(model="base", prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_pinned_prompt_versions(openai_client, client, base):
    ask = lambda model: openai_client.completions.create(model=model, prompt="Once", max_tokens=6,  # noqa: E731
                                                         temperature=0).choices[0].text
    first = ask("helper")
    assert upload(client, "helper", make_prompt_bytes(base, "helper", seed=8, scale=2.0)).status_code == 200
    second = ask("helper")
    assert second != first
    assert ask("helper@1") == first and ask("helper@2") == second
    with pytest.raises(openai.NotFoundError):
        ask("helper@9")


def test_served_model_id_sources(tmp_path):
    from app.engine.weights import served_model_id

    assert served_model_id("my-name", "default", tmp_path, "x") == "my-name"
    assert served_model_id(None, "default", tmp_path, "x") == HUB_ID
    assert served_model_id(None, "acme/smol", tmp_path, "x") == "acme/smol"  # --model given as a hub id
    for name_or_path, want in (("org/model-7b", "org/model-7b"), ("/home/me/checkpoints/run3", "folder")):
        directory = tmp_path / want.replace("/", "_")
        directory.mkdir()
        (directory / "config.json").write_text(f'{{"_name_or_path": "{name_or_path}"}}')
        assert served_model_id(None, str(directory), directory, "folder") == want


def test_tokenize_and_detokenize(client, openai_client):
    text = client.post("/tokenize", json={"model": "base", "prompt": "Hello world", "return_token_strs": True}).json()
    ids = text["tokens"]
    assert text["count"] == len(ids) and text["token_strs"] == ["Hello", "Ġworld"]
    assert text["max_model_len"] == 1024
    assert client.post("/tokenize", json={"model": "helper", "prompt": "Hi"}).json()["max_model_len"] == 1024 - 4
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.post("/tokenize", json={"messages": messages}).json()
    answer = openai_client.chat.completions.create(model="base", messages=messages, max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens
    bad = client.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={"model": "ghost", "prompt": "x"}).status_code == 404
