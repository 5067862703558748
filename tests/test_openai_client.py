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


def test_models(client):
    ids = {m.id for m in client.models.list()}
    assert {"base", "helper", "tagger"} <= ids
    assert client.models.retrieve("tagger").id == "tagger"
    with pytest.raises(openai.NotFoundError, match="no model named 'ghost'"):
        client.models.retrieve("ghost")


@pytest.mark.parametrize("model", ["base", "helper"])
def test_chat(client, model):
    messages = [{"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


@pytest.mark.parametrize("model", ["base", "helper"])
def test_completions(client, model):
    full = client.completions.create(model=model, prompt="The weather today is", max_tokens=8, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens > 0
    chunks = list(client.completions.create(model=model, prompt="The weather today is", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text


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
