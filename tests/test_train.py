"""Prompt training: frozen base, lower held-out loss, prompts that serve as they trained, shipped scores, bad data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app import LLM
from app.engine.engine import EngineConfig
from app.engine.model import DenseAttention
from app.engine.sampling import SamplingParams
from app.engine.task_prompt import build_task_prompt
from app.engine.weights import load_hf_directory
from app.train.data import IGNORE, DataError, bio_labels, infer_labels, load_examples, read_jsonl
from app.train.metrics import bio_entities
from app.train.trainer import (TrainConfig, TrainHooks, TrainingStopped, batch_tensors, evaluate, evaluate_prompt,
                               new_prompt, to_prompt_file, train)
from prompt_store.format import Task, dump_prompt, load_prompt_bytes

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
SHIPPED = ROOT / "examples" / "prompts"
FILES = {"generate": "chat", "tag": "ner", "classify": "spam"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A tiny random Llama (GQA, untied head) whose vocabulary fits the default tokenizer's ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=512,
                         pad_token_id=2, eos_token_id=2, bos_token_id=1)
    directory = tmp_path_factory.mktemp("tiny-train")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.hf.save_pretrained(directory)
    return load_hf_directory(directory, torch.float32, "cpu", "tiny-train")


def task_data(task, tokenizer, n_train=16, n_heldout=8):
    name = FILES[task]
    rows = read_jsonl(DATA / f"{name}.train.jsonl")[:n_train]
    labels = infer_labels(task, rows, name)
    train_set = load_examples(DATA / f"{name}.train.jsonl", task, tokenizer, labels, 96, rows=rows)
    held_rows = read_jsonl(DATA / f"{name}.heldout.jsonl")[:n_heldout]
    heldout = load_examples(DATA / f"{name}.heldout.jsonl", task, tokenizer, labels, 96, rows=held_rows)
    return labels, train_set, heldout


def quick_config(task, kind, **kw):
    return TrainConfig(task=task, kind=kind, virtual_tokens=4, epochs=3, batch_size=8, progress=False,
                       lr=0.1 if kind == "prompt" else 0.05, head_lr=0.02, warmup=0.0, **kw)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("task", ["generate", "tag", "classify"])
def test_training_lowers_heldout_loss_and_leaves_the_base_frozen(tiny, tokenizer, task, kind):
    labels, train_set, heldout = task_data(task, tokenizer)
    config = quick_config(task, kind)
    base_before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    untrained = new_prompt(tiny, config, labels)  # the same seed gives train()'s starting point
    before = evaluate(tiny.model, untrained, heldout, labels)

    result = train(tiny, config, labels, train_set, heldout)

    assert result.steps == 6
    assert result.metrics["loss"] < before["loss"] - 0.01, (before, result.history)
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())
    after = tiny.model.state_dict()
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in after), "a base weight changed"
    assert not torch.equal(result.prompt.embeddings, untrained.embeddings)
    if task == "generate":
        assert result.prompt.head is None
    else:
        assert not torch.equal(result.prompt.head.weight, untrained.head.weight)
    trained = {n for n, p in result.prompt.named_parameters()}
    assert trained == ({"embeddings"} if task == "generate" else {"embeddings", "head.weight", "head.bias"})


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_hooks_report_steps_and_a_run_resumed_from_a_checkpoint_ends_as_an_unbroken_one(tiny, tokenizer, kind):
    """What the fine-tuning service relies on: per-step progress, a checkpoint per epoch, resume, stop."""
    labels, train_set, heldout = task_data("classify", tokenizer)
    config = quick_config("classify", kind)
    steps, checkpoints = [], []
    unbroken = train(tiny, config, labels, train_set, heldout, TrainHooks(
        on_step=lambda step, total, loss, tokens: steps.append((step, total, tokens)),
        on_epoch=lambda record, checkpoint: checkpoints.append(checkpoint)))
    assert [(step, total) for step, total, _ in steps] == [(i, 6) for i in range(1, 7)]
    assert unbroken.tokens == sum(tokens for _, _, tokens in steps) == 3 * sum(len(e.input_ids) for e in train_set)
    assert [c["step"] for c in checkpoints] == [2, 4, 6]

    resumed = train(tiny, config, labels, train_set, heldout, TrainHooks(resume=checkpoints[0]))
    assert resumed.history == unbroken.history and resumed.steps == 6 and resumed.tokens == unbroken.tokens
    assert torch.equal(resumed.prompt.embeddings, unbroken.prompt.embeddings)
    assert torch.equal(resumed.prompt.head.weight, unbroken.prompt.head.weight)
    with pytest.raises(TrainingStopped, match="step 3"):
        train(tiny, config, labels, train_set, heldout, TrainHooks(stop=lambda: len(steps) >= 9,
                                                                   on_step=lambda *a: steps.append(a)))


def test_a_step_gives_gradients_only_to_the_prompt_and_head(tiny, tokenizer):
    labels, train_set, _ = task_data("tag", tokenizer)
    prompt = new_prompt(tiny, quick_config("tag", "prefix"), labels)
    from app.train.trainer import task_outputs

    loss, n, _, _ = task_outputs(tiny.model, prompt, *batch_tensors(train_set[:4], "cpu"))
    (loss / n).backward()
    assert prompt.embeddings.grad is not None and prompt.embeddings.grad.abs().sum() > 0
    assert prompt.head.weight.grad is not None
    assert all(p.grad is None for p in tiny.model.parameters())


def engine_outputs(loaded, tokenizer, pf, requests):
    with LLM.from_model(loaded.model, tokenizer, EngineConfig(max_seq_len=256, kv_cache_bytes=1 << 24)) as llm:
        llm.load_prompt(pf)
        return llm.run([(pf.name, ids, task, params) for ids, task, params in requests])


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("task", ["generate", "tag", "classify"])
def test_a_saved_prompt_serves_exactly_as_it_trained(tiny, tokenizer, task, kind):
    labels, train_set, heldout = task_data(task, tokenizer, n_train=8, n_heldout=3)
    result = train(tiny, quick_config(task, kind, max_steps=2), labels, train_set, [])
    prompt = result.prompt.eval()
    pf = load_prompt_bytes(dump_prompt(to_prompt_file(tiny, prompt, f"t-{task}-{kind}", labels)))
    assert pf.kind == kind and pf.task == task and pf.labels == labels
    torch.testing.assert_close(pf.prompt_embeddings, prompt.embeddings.detach(), rtol=0, atol=0)

    if task == "generate":
        inputs = [e.input_ids[:e.targets.index(next(t for t in e.targets if t != IGNORE)) + 1] for e in heldout]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
        outs = engine_outputs(tiny, tokenizer, pf, [(ids, Task.GENERATE, params) for ids in inputs])
        for ids, out in zip(inputs, outs):
            tokens, first_logprob = list(ids), None
            with torch.no_grad():
                for _ in range(6):  # greedy over the training forward, the whole text each time
                    t = torch.tensor([tokens])
                    logits = tiny.model.logits(prompt.text_hidden(tiny.model, t, torch.ones_like(t, dtype=torch.bool)))
                    logprobs = logits[0, -1].float().log_softmax(-1)
                    first_logprob = logprobs if first_logprob is None else first_logprob
                    tokens.append(int(logprobs.argmax()))
            assert [c.token_id for c in out.tokens] == tokens[len(ids):]
            first = out.tokens[0]
            assert abs(first.logprob - float(first_logprob[first.token_id])) < 1e-4
        return

    outs = engine_outputs(tiny, tokenizer, pf, [(e.input_ids, Task(task), None) for e in heldout])
    ids, mask, targets, lengths = batch_tensors(heldout, "cpu")
    with torch.no_grad():
        probs = prompt.head_logits(prompt.text_hidden(tiny.model, ids, mask)).softmax(-1)
    for row, (e, out) in enumerate(zip(heldout, outs)):
        n = len(e.input_ids)
        expected = probs[row, :n] if task == "tag" else probs[row, n - 1]
        assert out.probs.shape == expected.shape
        assert (out.probs - expected).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_a_saved_prompt_gives_the_training_logits_through_its_kv_prefix(tiny, tokenizer, kind):
    labels, train_set, heldout = task_data("generate", tokenizer, n_train=8, n_heldout=2)
    prompt = train(tiny, quick_config("generate", kind, max_steps=2), labels, train_set, []).prompt
    pf = load_prompt_bytes(dump_prompt(to_prompt_file(tiny, prompt, "kv", labels)))
    served = build_task_prompt(tiny.model, pf, tokenizer.encode)
    P = served.num_virtual_tokens
    ids = torch.tensor([heldout[0].input_ids])
    with torch.no_grad():
        prefix = [(served.k[i][None], served.v[i][None]) for i in range(tiny.args.num_layers)]
        positions = P + torch.arange(ids.shape[1])[None]
        serving = tiny.model.logits(tiny.model(positions, DenseAttention(prefix=prefix), tokens=ids))
        training = tiny.model.logits(prompt.text_hidden(tiny.model, ids, torch.ones_like(ids, dtype=torch.bool)))
    assert (serving - training).abs().max() < 1e-4


# ---- the shipped example prompts ----------------------------------------------------------------------

@pytest.mark.parametrize("name,metric", [("ner", "f1"), ("spam", "accuracy")])
def test_shipped_prompts_reach_their_recorded_heldout_scores(default_model, tokenizer, name, metric):
    recorded = json.loads((SHIPPED / "metrics.json").read_text())[name]
    subset = recorded["ci_subset"]
    scores = evaluate_prompt(default_model, tokenizer, SHIPPED / f"{name}.safetensors",
                             DATA / f"{name}.heldout.jsonl", limit=subset["examples"])
    # the same lines as recorded at training time: only float noise across machines may differ
    assert scores[metric] >= subset[metric] - 0.02, (scores, subset)
    # and the subset is representative of the whole held-out file, within sampling error
    assert scores[metric] >= recorded["heldout"][metric] - 0.08, (scores, recorded["heldout"])


def test_shipped_prompt_files_are_small_and_for_the_default_model(default_model):
    from app.engine.weights import base_identity
    from prompt_store.format import load_prompt_file, validate_prompt

    for name, task in (("chat", "generate"), ("ner", "tag"), ("spam", "classify")):
        path = SHIPPED / f"{name}.safetensors"
        pf = load_prompt_file(path)
        validate_prompt(pf, base_identity(default_model))
        assert pf.task == task and pf.name == name and pf.source == "softserve-train"
        assert path.stat().st_size < 1_100_000
    assert load_prompt_file(SHIPPED / "spam.safetensors").labels == ["ham", "spam"]
    assert load_prompt_file(SHIPPED / "ner.safetensors").labels == bio_labels(["ORG", "PERSON", "DATE", "LOC"])


# ---- data ------------------------------------------------------------------------------------------------

def test_bio_labels_follow_the_character_spans(tokenizer):
    text = "Thandiwe Singh resigned from Obsidian LLC."
    labels = bio_labels(["PERSON", "ORG"])
    path = Path("mem.jsonl")
    rows = [(1, {"text": text, "entities": [{"start": 0, "end": 14, "label": "PERSON"},
                                             {"start": 29, "end": 41, "label": "ORG"}]})]
    (example,) = load_examples(path, "tag", tokenizer, labels, 64, rows=rows)
    ids, offsets = tokenizer.encode_with_offsets(text)
    tags = [labels[i] for i in example.targets]
    words = {text[a:b].strip(): tag for (a, b), tag in zip(offsets, tags)}
    assert tags[0] == "B-PERSON" and all(t == "I-PERSON" for t, (a, b) in zip(tags, offsets) if 0 < a < 14)
    assert words["resigned"] == "O" and words["from"] == "O" and words["."] == "O"
    first_org = next(i for i, (a, b) in enumerate(offsets) if b > 29)
    assert tags[first_org] == "B-ORG" and tags[first_org - 1] == "O"
    assert bio_entities(tags) == {("PERSON", 0, tags.index("O")),
                                  ("ORG", tags.index("B-ORG"), len(tags) - 1)}


def test_generate_targets_are_the_answer_and_end_of_turn_only(tokenizer):
    rows = [(1, {"messages": [{"role": "user", "content": "What is 2 x 3?"},
                              {"role": "assistant", "content": "2 x 3 = 6."}]}),
            (2, {"prompt": "Q: 2 x 3?\nA:", "completion": " 6"})]
    chat, plain = load_examples(Path("mem.jsonl"), "generate", tokenizer, [], 256, rows=rows)
    answer = tokenizer.encode("2 x 3 = 6.") + [2]
    prompt = tokenizer.apply_chat_template(rows[0][1]["messages"][:1])
    assert chat.input_ids == prompt + answer
    assert [t for t in chat.targets if t != IGNORE] == answer
    assert chat.targets[len(prompt) - 1] == answer[0]
    assert plain.input_ids == tokenizer.encode("Q: 2 x 3?\nA:") + tokenizer.encode(" 6") + [2]


def test_entity_decoding_and_scores():
    from app.train.metrics import EntityScore

    assert bio_entities(["B-ORG", "I-ORG", "O", "I-LOC", "B-LOC", "B-LOC"]) == {
        ("ORG", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("LOC", 5, 6)}
    score = EntityScore()
    score.add(["B-ORG", "I-ORG", "O", "B-DATE"], ["B-ORG", "O", "O", "B-DATE"])
    assert score.result() == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


BAD = [
    ("classify", '{"text": "hi", "label": "ham"}\n{"text": "hello"}\n', 2, "missing field 'label'"),
    ("classify", '{"text": "hi", "label": "ham"}\n{"text": "hi", "label": "ham"\n', 2, "invalid JSON"),
    ("classify", '{"text": "hi", "label": "eggs"}\n', 1, "unknown label 'eggs'"),
    ("tag", '{"text": "Acme Inc.", "entities": []}\n{"text": "Acme Inc.", "entities": '
            '[{"start": 0, "end": 40, "label": "ORG"}]}\n', 2, "out of range"),
    ("tag", '{"text": "Acme Inc. Paris", "entities": [{"start": 0, "end": 9, "label": "ORG"}, '
            '{"start": 5, "end": 15, "label": "LOC"}]}\n', 1, "overlap"),
    ("tag", '{"text": "Acme Inc.", "entities": [{"start": 0, "end": 4, "label": "FOOD"}]}\n', 1,
     "unknown entity label 'FOOD'"),
    ("generate", '{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "last message"),
    ("generate", '{"prompt": "hi"}\n', 1, "missing field 'completion'"),
    ("classify", "", 0, "empty"),
]


@pytest.mark.parametrize("task,content,line,message", BAD)
def test_bad_data_stops_naming_the_file_and_line(tmp_path, tokenizer, task, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    labels = {"classify": ["ham", "spam"], "tag": bio_labels(["ORG", "LOC"]), "generate": []}[task]
    with pytest.raises(DataError) as info:
        load_examples(path, task, tokenizer, labels, 64)
    text = str(info.value)
    assert message in text
    assert (f"{path}:{line}:" in text) if line else text.startswith(str(path))


def test_the_cli_reports_bad_data_and_exits_2(tmp_path, capsys):
    from app.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hi", "label": "ham"}\nnot json\n')
    assert main(["train", str(path), "--name", "bad"]) == 2
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err


def test_the_cli_trains_writes_a_valid_prompt_and_metrics(tiny, tmp_path, capsys):
    from app.cli import main
    from prompt_store.format import load_prompt_file

    data = tmp_path / "spam.jsonl"
    data.write_text("".join(open(DATA / "spam.train.jsonl").readlines()[:20]))
    out = tmp_path / "p" / "spam-tiny.safetensors"
    rc = main(["train", str(data), "--name", "spam-tiny", "--model", str(tiny.directory), "--device", "cpu",
               "--virtual-tokens", "3", "--epochs", "1", "--heldout-fraction", "0.25", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    pf = load_prompt_file(out)
    assert (pf.task, pf.kind, pf.labels, pf.num_virtual_tokens) == ("classify", "prompt", ["ham", "spam"], 3)
    assert pf.base.fingerprint == tiny.fingerprint and pf.head_weight.shape == (2, 64)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["train_examples"] == 15 and metrics["heldout"]["examples"] == 5
    accuracy = metrics["heldout"]["accuracy"]
    assert accuracy * 5 == round(accuracy * 5)  # a share of the 5 held-out messages
    assert f"accuracy={accuracy:.4f}" in capsys.readouterr().out  # what the command printed


def test_push_uploads_the_file_with_the_admin_token(monkeypatch):
    import httpx

    from app.config import Settings
    from app.train.cli import push

    seen = {}

    def fake_put(url, files, headers, timeout):
        seen.update(url=url, files=files, headers=headers)
        return httpx.Response(200, json={"name": "spam", "version": 3}, request=httpx.Request("PUT", url))

    monkeypatch.setattr(httpx, "put", fake_put)
    monkeypatch.setenv("SOFTSERVE_ADMIN_TOKEN", "s3cret")
    assert push("http://server:8000/", "spam", b"bytes", Settings().admin_token) == 0
    assert seen["url"] == "http://server:8000/v1/prompts/spam"
    assert seen["files"]["file"][1] == b"bytes"
    assert seen["headers"] == {"Authorization": "Bearer s3cret"}


def test_evaluation_with_a_shared_shallow_prefix_matches_the_training_forward(tiny, tokenizer):
    labels, _, heldout = task_data("classify", tokenizer, n_train=16, n_heldout=6)
    prompt = new_prompt(tiny, quick_config("classify", "prompt"), labels)
    ids, mask, _, _ = batch_tensors(heldout, "cpu")
    with torch.no_grad():
        per_row = prompt.text_hidden(tiny.model, ids, mask)
        shared = prompt.text_hidden(tiny.model, ids, mask, shared_prefix=True)
    assert (per_row - shared)[mask].abs().max() < 1e-4
