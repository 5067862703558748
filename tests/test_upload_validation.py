"""Uploads are validated before anything is computed with the model: every bad file, prompt file or PEFT
adapter, is a 422 that says what is wrong (never a 500), a prompt over the virtual-token limit is refused
without the forward whose memory grows with the square of its rows, and metadata has limits."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prompt_store.format import (
    MAX_DESCRIPTION_CHARS,
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    MAX_VIRTUAL_TOKENS,
    BaseIdentity,
    PromptFile,
    dump_prompt,
    embedding_width,
)
from tests.live_server import make_prompt_bytes, upload

OVER_LIMIT_ROWS = 3000  # before validation came first: a 24 s forward and +820 MB before the 422
RSS_GROWTH_LIMIT_MB = 200  # what refusing it may add to the server's peak memory (measured: under 10 MB)


def prompt_bytes(base: dict, rows: int = 4, width: int | None = None, task: str = "generate", labels=(),
                 head_shape=None, description: str = "test", base_changes: dict | None = None) -> bytes:
    """A softserve prompt file, wrong in the ways asked for (dump_prompt writes what it is given)."""
    identity = BaseIdentity.from_dict({**base, **(base_changes or {})})
    head = None if head_shape is None else torch.randn(*head_shape) * 0.1
    pf = PromptFile(name="x", kind="prompt", task=task, num_virtual_tokens=rows, labels=list(labels),
                    description=description, base=identity,
                    prompt_embeddings=torch.randn(rows, width or identity.hidden_size) * 0.5, head_weight=head)
    return dump_prompt(pf)


def with_metadata(data: bytes, **changes: str) -> bytes:
    """The same prompt file with some metadata values replaced."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    tensors = safetensors.torch.load(data)
    return safetensors.torch.save(tensors, metadata={**header["__metadata__"], **changes})


def adapter_files(config: dict, tensors: dict[str, torch.Tensor]) -> dict:
    return {"adapter_config": ("adapter_config.json", json.dumps(config).encode()),
            "adapter_model": ("adapter_model.safetensors", safetensors.torch.save(tensors))}


def peft_config(peft_type: str = "PROMPT_TUNING", task_type: str = "CAUSAL_LM", rows: int = 4, **extra) -> dict:
    return {"peft_type": peft_type, "task_type": task_type, "num_virtual_tokens": rows, **extra}


def refusal(response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["error"]["message"]


def store_files(server) -> list[Path]:
    return sorted(p.relative_to(server.store) for p in server.store.rglob("*.safetensors"))


def nan_prompt(base: dict) -> bytes:
    identity = BaseIdentity.from_dict(base)
    embeddings = torch.zeros(4, identity.hidden_size)
    embeddings[1, 2] = float("nan")
    return dump_prompt(PromptFile("x", "prompt", "generate", 4, [], "", identity, embeddings))


FILE_CASES = {
    "wrong width": (lambda b: prompt_bytes(b, width=100), r"must be 576 wide \(hidden_size\), got 100"),
    "0 rows": (lambda b: prompt_bytes(b, rows=0), "num_virtual_tokens must be between 1 and 512, got 0"),
    "over the virtual-token limit": (lambda b: prompt_bytes(b, rows=MAX_VIRTUAL_TOKENS + 1),
                                     "num_virtual_tokens must be between 1 and 512, got 513"),
    "head of the wrong shape": (lambda b: prompt_bytes(b, task="tag", labels=["O", "X"], head_shape=(2, 100)),
                                r"head.weight must be \[num_labels, hidden\] = \[2, 576\], got \[2, 100\]"),
    "3-D head": (lambda b: prompt_bytes(b, task="classify", labels=["a", "b"], head_shape=(2, 576, 1)),
                 r"head.weight must be \[num_labels, hidden\]"),
    "empty label": (lambda b: prompt_bytes(b, task="classify", labels=["", "b"], head_shape=(2, 576)),
                    "labels must be non-empty strings"),
    "empty label, no head": (lambda b: prompt_bytes(b, task="classify", labels=["", "b"]),
                             "labels must be non-empty strings"),
    "base with another hidden size": (lambda b: prompt_bytes(b, base_changes={"hidden_size": 64}),
                                      "a base with hidden_size=64, this server's base has hidden_size=576"),
    "non-finite values": (nan_prompt, "prompt_embeddings contains NaN or infinite values"),
    "description over the limit": (lambda b: prompt_bytes(b, description="d" * (MAX_DESCRIPTION_CHARS + 1)),
                                   f"description is {MAX_DESCRIPTION_CHARS + 1} characters long; the limit is "
                                   f"{MAX_DESCRIPTION_CHARS}"),
    "metadata over the limit": (lambda b: prompt_bytes(b, description="d" * MAX_METADATA_BYTES),
                                f"metadata is [0-9]+ bytes; the limit is {MAX_METADATA_BYTES} bytes"),
    "labels nested 100,000 deep": (lambda b: with_metadata(prompt_bytes(b), **{
        "softserve.labels": "[" * 100_000 + "]" * 100_000}),
        f"metadata softserve.labels is nested more than {MAX_JSON_DEPTH} levels deep"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_prompt_files_are_422_naming_the_problem(client, base, server, case):
    make, message = FILE_CASES[case]
    before = store_files(server)
    assert re.search(message, refusal(upload(client, "bad-file", make(base))))
    assert store_files(server) == before
    assert client.get("/v1/prompts/bad-file").status_code == 404
    assert client.get("/v1/prompts").status_code == 200


DEEP = embedding_width("prefix", BaseIdentity("llama", 576, 30, 3, 64, 49152, "x"))  # the default model's
ADAPTER_CASES = {
    "wrong width": (peft_config(), {"prompt_embeddings": torch.randn(4, 100)}, None,
                    r"must be 576 wide \(hidden_size\), got 100"),
    "0 rows": (peft_config(rows=0), {"prompt_embeddings": torch.randn(0, 576)}, None,
               "num_virtual_tokens must be between 1 and 512, got 0"),
    "over the virtual-token limit": (peft_config(rows=600), {"prompt_embeddings": torch.randn(600, 576)}, None,
                                     "num_virtual_tokens must be between 1 and 512, got 600"),
    "head of the wrong shape": (peft_config(task_type="SEQ_CLS"), {"prompt_embeddings": torch.randn(4, 576),
                                                                   "score.weight": torch.randn(2, 100)}, None,
                                r"head.weight must be \[num_labels, hidden\] = \[2, 576\], got \[2, 100\]"),
    "empty label": (peft_config(task_type="SEQ_CLS"), {"prompt_embeddings": torch.randn(4, 576),
                                                       "score.weight": torch.randn(2, 576)}, '["", "b"]',
                    "labels must be non-empty strings"),
    "prefix for a base with other layers": (peft_config("PREFIX_TUNING", num_layers=2, num_attention_heads=3,
                                                        token_dim=192),
                                            {"prompt_embeddings": torch.randn(4, 2 * 2 * 192)}, None,
                                            "prefix adapter was made for num_layers=2, this server's base needs "
                                            "num_layers=30"),
    "prefix for a base with another hidden size": (peft_config("PREFIX_TUNING"),
                                                   {"prompt_embeddings": torch.randn(4, DEEP // 2)}, None,
                                                   rf"prefix prompt_embeddings must be {DEEP} wide"),
    "non-finite values": (peft_config(), {"prompt_embeddings": torch.full((4, 576), float("inf"))}, None,
                          "prompt_embeddings contains NaN or infinite values"),
    "labels nested 100,000 deep": (peft_config(task_type="SEQ_CLS"), {"prompt_embeddings": torch.randn(4, 576)},
                                   "[" * 100_000 + "]" * 100_000,
                                   f"labels is nested more than {MAX_JSON_DEPTH} levels deep"),
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_bad_adapters_are_422_naming_the_problem(client, server, case):
    config, tensors, labels, message = ADAPTER_CASES[case]
    before = store_files(server)
    r = client.put("/v1/prompts/bad-adapter", files=adapter_files(config, tensors),
                   data={"labels": labels} if labels else {})
    assert re.search(message, refusal(r))
    assert store_files(server) == before
    assert client.get("/v1/prompts").status_code == 200


@pytest.mark.parametrize("config, message", [
    ('{"peft_type": ' + "[" * 100_000 + "]" * 100_000 + "}",
     f"adapter_config.json is nested more than {MAX_JSON_DEPTH} levels deep"),
    (json.dumps({**peft_config(), "notes": "n" * MAX_METADATA_BYTES}),
     f"adapter_config.json is [0-9]+ bytes; the limit is {MAX_METADATA_BYTES} bytes"),
])
def test_adapter_config_over_the_limits_is_422(client, config, message):
    files = {"adapter_config": ("adapter_config.json", config.encode()),
             "adapter_model": ("adapter_model.safetensors", safetensors.torch.save({"prompt_embeddings": torch.randn(4, 576)}))}
    assert re.search(message, refusal(client.put("/v1/prompts/bad-adapter", files=files)))


def test_description_form_field_over_the_limit_is_422(client, base):
    r = upload(client, "long-description", make_prompt_bytes(base, "x"),
               data={"description": "d" * (MAX_DESCRIPTION_CHARS + 1)})
    assert f"description is {MAX_DESCRIPTION_CHARS + 1} characters long; the limit is {MAX_DESCRIPTION_CHARS}" in refusal(r)
    r = upload(client, "long-description", make_prompt_bytes(base, "x"), data={"description": "d" * MAX_DESCRIPTION_CHARS})
    assert r.status_code == 201 and r.json()["description"] == "d" * MAX_DESCRIPTION_CHARS


def peak_rss_growth_mb(pid: int, call) -> float:
    """How much higher the process's peak resident memory went during call() than before it (Linux: clear_refs
    5 resets the peak to the current size)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    start = _status_kb(pid, "VmHWM")
    call()
    return (_status_kb(pid, "VmHWM") - start) / 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.parametrize("kind", ["prompt file", "adapter"])
def test_over_the_limit_rows_are_refused_without_a_forward(client, base, server, kind):
    """3,000 rows: validated before anything is computed, so the refusal costs a parse of the upload, not a
    forward whose attention alone needs 3000^2 x 9 heads x 4 bytes = 324 MB per layer."""
    if kind == "prompt file":
        send = lambda: upload(client, "huge", prompt_bytes(base, rows=OVER_LIMIT_ROWS))  # noqa: E731
    else:
        tensors = {"prompt_embeddings": torch.randn(OVER_LIMIT_ROWS, 576)}
        send = lambda: client.put("/v1/prompts/huge",  # noqa: E731
                                  files=adapter_files(peft_config(rows=OVER_LIMIT_ROWS), tensors))
    responses = []
    growth = peak_rss_growth_mb(server.proc.pid, lambda: responses.append(send()))
    assert f"got {OVER_LIMIT_ROWS}" in refusal(responses[0])
    assert growth < RSS_GROWTH_LIMIT_MB


def test_an_upload_is_built_once_and_served_as_built(client, base):
    """The prompt the upload checked is the one served: loaded as soon as the upload returns, before any request."""
    def loaded() -> int:
        metrics = client.get("/metrics").text
        return int(float(re.search(r"^softserve_prompts_loaded (\S+)$", metrics, re.M).group(1)))

    before = loaded()
    r = upload(client, "built-once", make_prompt_bytes(base, "x", seed=3))
    assert r.status_code == 201 and r.json()["serving"] is True
    assert loaded() == before + 1
    completion = client.post("/v1/completions", json={"model": "built-once", "prompt": "Hi", "max_tokens": 3,
                                                      "temperature": 0})
    assert completion.status_code == 200
