"""The official `openai` client against a live server: chat and completions, streaming and not, with a prompt."""
from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.live_server import LiveServer, make_prompt_bytes, upload  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(tmp_path_factory.mktemp("openai") / "store") as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            base = c.get("/v1/prompts").json()["base"]
            assert upload(c, "helper", make_prompt_bytes(base, "helper", seed=7)).status_code == 201
            assert upload(c, "tagger", make_prompt_bytes(base, "tagger", "tag", labels=["O", "B-X"])).status_code == 201
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_models(client):
    cards = {m.id: m for m in client.models.list()}
    assert {HUB_ID, "base", "helper", "tagger"} <= set(cards)
    assert cards["helper"].parent == HUB_ID and cards["base"].root == HUB_ID and cards[HUB_ID].parent is None
    ask = lambda model: client.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=0).choices[0].text  # noqa: E731
    assert ask(HUB_ID) == ask("base")
    assert client.models.retrieve("tagger").id == "tagger"
    with pytest.raises(openai.NotFoundError, match="no model named 'ghost'"):
        client.models.retrieve("ghost")


@pytest.mark.parametrize("model", ["base", "helper"])
def test_chat(client, model):
    messages = [{"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant"
    generated = full.usage.completion_tokens  # cut at max_tokens exactly when it says length
    assert 1 <= generated <= 8 and full.choices[0].finish_reason == ("length" if generated == 8 else "stop")
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


@pytest.mark.parametrize("model", ["base", "helper"])
def test_completions(client, model):
    full = client.completions.create(model=model, prompt="The weather today is", max_tokens=8, temperature=0)
    assert full.object == "text_completion"
    generated = full.usage.completion_tokens
    assert 1 <= generated <= 8 and full.choices[0].finish_reason == ("length" if generated == 8 else "stop")
    chunks = list(client.completions.create(model=model, prompt="The weather today is", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_seeded_sampling_repeats(client):
    make = lambda: client.completions.create(model="helper", prompt="Once", max_tokens=8, temperature=0.9,  # noqa: E731
                                             seed=1234, top_p=0.9).choices[0].text
    assert make() == make()


def test_errors_map_to_client_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError, match="tag"):
        client.chat.completions.create(model="tagger", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="x", max_tokens=100_000)
    assert client.completions.create(model="base", prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_pinned_prompt_versions(client, server):
    ask = lambda model: client.completions.create(model=model, prompt="Once", max_tokens=6,  # noqa: E731
                                                  temperature=0).choices[0].text
    first = ask("helper")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        base = c.get("/v1/prompts").json()["base"]
        assert upload(c, "helper", make_prompt_bytes(base, "helper", seed=8, scale=2.0)).status_code == 200
    second = ask("helper")
    assert second != first
    assert ask("helper@1") == first and ask("helper@2") == second
    with pytest.raises(openai.NotFoundError):
        ask("helper@9")


def test_served_model_id_sources(tmp_path):
    from app.api.common import _model_id

    assert _model_id("my-name", "default", tmp_path, "x") == "my-name"
    assert _model_id(None, "default", tmp_path, "x") == HUB_ID
    assert _model_id(None, "acme/smol", tmp_path, "x") == "acme/smol"  # --model given as a hub id
    for name_or_path, want in (("org/model-7b", "org/model-7b"), ("/home/me/checkpoints/run3", "folder")):
        directory = tmp_path / want.replace("/", "_")
        directory.mkdir()
        (directory / "config.json").write_text(f'{{"_name_or_path": "{name_or_path}"}}')
        assert _model_id(None, str(directory), directory, "folder") == want


def test_tokenize_and_detokenize(server, client):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        text = c.post("/tokenize", json={"model": "base", "prompt": "Hello world", "return_token_strs": True}).json()
        ids = text["tokens"]
        assert text["count"] == len(ids) and text["token_strs"] == ["Hello", "Ġworld"]
        assert text["max_model_len"] == 1024
        assert c.post("/tokenize", json={"model": "helper", "prompt": "Hi"}).json()["max_model_len"] == 1024 - 4
        assert c.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
        messages = [{"role": "user", "content": "Hi"}]
        chat = c.post("/tokenize", json={"messages": messages}).json()
        answer = client.chat.completions.create(model="base", messages=messages, max_tokens=1)
        assert chat["count"] == answer.usage.prompt_tokens
        bad = c.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert c.post("/tokenize", json={"model": "ghost", "prompt": "x"}).status_code == 404
