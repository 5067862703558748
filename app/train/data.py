"""Training data: JSON Lines for the three tasks, checked line by line, tokenized as serving tokenizes.

generate  {"messages": [...]}: the input is the chat template over every message before the last
          (with the generation prompt), the target is the last (assistant) message then end-of-turn.
          {"prompt", "completion"}: the input is the prompt's tokens, the target the completion's then eos.
tag       {"text", "entities": [{"start", "end", "label"}]}: character spans -> token BIO labels through the
          tokenizer's offsets (B-X on the first token overlapping the span, I-X on the rest, O elsewhere).
classify  {"text", "label"}.

Bad data raises DataError naming the file and line; nothing is skipped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from app.engine.tokenizer import ChatTemplateError, Tokenizer
from prompt_store.format import TASKS, Task

IGNORE = -100  # target of a position without loss
MAX_LENGTH = 256  # text tokens per example by default (training and evaluation); longer ones are cut


class DataError(ValueError):
    """The training data is unusable; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]  # the text tokens, as the server receives them (plus the target for generate)
    targets: list[int]  # generate: next-token ids or IGNORE per position; tag: label per token;
    # classify: [label index]


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; DataError on unreadable or non-object lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    return parse_jsonl(text, path)


def parse_jsonl(text: str, path: Path) -> list[tuple[int, dict]]:
    """read_jsonl's lines from text already read; `path` names it in errors."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON: {e.msg}") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        rows.append((number, obj))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def bio_labels(entity_types) -> list[str]:
    """["O", "B-A", "I-A", "B-B", "I-B", ...] over the sorted entity types."""
    return ["O"] + [f"{p}-{t}" for t in sorted(set(entity_types)) for p in ("B", "I")]


def entity_types(labels: list[str]) -> list[str]:
    return sorted({label[2:] for label in labels if label != "O"})


def infer_labels(task: str, rows: list[tuple[int, dict]], path: Path) -> list[str]:
    """The label list a head is trained for, from the data (sorted; BIO for tag)."""
    if task == Task.GENERATE:
        return []
    if task == Task.CLASSIFY:
        return sorted({_field(row, "label", str, path, n) for n, row in rows})
    return bio_labels(_field(e, "label", str, path, n) for n, row in rows
                      for e in _field(row, "entities", list, path, n) if isinstance(e, dict))


def load_examples(path: Path, task: str, tokenizer: Tokenizer, labels: list[str], max_length: int,
                  rows: list[tuple[int, dict]] | None = None) -> list[Example]:
    """Tokenize every line; labels are the head's labels (BIO labels for tag). Longer inputs are cut
    to max_length tokens (generate keeps the end of its input and the start of its target)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    path = Path(path)
    rows = read_jsonl(path) if rows is None else rows
    convert = {Task.GENERATE: _generate, Task.TAG: _tag, Task.CLASSIFY: _classify}[Task(task)]
    return [convert(row, tokenizer, labels, max_length, path, n) for n, row in rows]


def _field(row: dict, key: str, kind: type, path: Path, n: int):
    if key not in row:
        raise DataError(f"{path}:{n}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DataError(f"{path}:{n}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _generate(row, tokenizer: Tokenizer, labels, max_length, path, n) -> Example:
    eos = min(tokenizer.eos_ids) if tokenizer.eos_ids else None
    if "messages" in row:
        messages = _field(row, "messages", list, path, n)
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                   and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{path}:{n}: 'messages' must be a non-empty list of {{role, content}} strings")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError(f"{path}:{n}: the last message must be the assistant's answer, after at least "
                            f"one message before it")
        try:
            prompt = tokenizer.apply_chat_template(messages[:-1])
        except ChatTemplateError as e:
            raise DataError(f"{path}:{n}: {e}") from e
        answer = messages[-1]["content"]
    elif "prompt" in row or "completion" in row:
        prompt = tokenizer.encode(_field(row, "prompt", str, path, n))
        answer = _field(row, "completion", str, path, n)
    else:
        raise DataError(f"{path}:{n}: a generate example needs 'messages' or 'prompt' and 'completion'")
    completion = tokenizer.encode(answer) + ([eos] if eos is not None else [])
    if not prompt or not answer:
        raise DataError(f"{path}:{n}: the input and the answer must both be non-empty")
    keep_prompt = max(1, min(len(prompt), max_length - 1)) if len(prompt) + len(completion) > max_length \
        else len(prompt)
    prompt = prompt[len(prompt) - keep_prompt:]
    completion = completion[:max(1, max_length - len(prompt))]
    ids = prompt + completion
    # position i predicts token i+1: the loss sits on the positions that predict the completion
    targets = [IGNORE] * (len(prompt) - 1) + completion + [IGNORE]
    return Example(ids, targets)


def _tag(row, tokenizer: Tokenizer, labels: list[str], max_length, path, n) -> Example:
    text = _field(row, "text", str, path, n)
    entities = _field(row, "entities", list, path, n)
    if not text:
        raise DataError(f"{path}:{n}: 'text' is empty")
    index = {label: i for i, label in enumerate(labels)}
    spans = []
    for e in entities:
        if not isinstance(e, dict):
            raise DataError(f"{path}:{n}: each entity must be an object with start, end, label")
        start, end = _field(e, "start", int, path, n), _field(e, "end", int, path, n)
        label = _field(e, "label", str, path, n)
        if not 0 <= start < end <= len(text):
            raise DataError(f"{path}:{n}: entity span [{start}, {end}) is out of range for a text of "
                            f"{len(text)} characters")
        if f"B-{label}" not in index:
            raise DataError(f"{path}:{n}: unknown entity label {label!r} (labels: "
                            f"{', '.join(entity_types(labels))})")
        spans.append((start, end, label))
    spans.sort()
    for (s1, e1, _), (s2, e2, _) in zip(spans, spans[1:]):
        if s2 < e1:
            raise DataError(f"{path}:{n}: entity spans [{s1}, {e1}) and [{s2}, {e2}) overlap")
    ids, offsets = tokenizer.encode_with_offsets(text)
    tags = [index["O"]] * len(ids)
    for start, end, label in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        if not inside:
            raise DataError(f"{path}:{n}: entity span [{start}, {end}) covers no token")
        tags[inside[0]] = index[f"B-{label}"]
        for i in inside[1:]:
            tags[i] = index[f"I-{label}"]
    return Example(ids[:max_length], tags[:max_length])


def _classify(row, tokenizer: Tokenizer, labels: list[str], max_length, path, n) -> Example:
    text = _field(row, "text", str, path, n)
    label = _field(row, "label", str, path, n)
    if label not in labels:
        raise DataError(f"{path}:{n}: unknown label {label!r} (labels: {', '.join(labels)})")
    ids = tokenizer.encode(text)
    if not ids:
        raise DataError(f"{path}:{n}: 'text' is empty")
    return Example(ids[:max_length], [labels.index(label)])
