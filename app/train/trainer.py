"""Prompt training: the base model frozen, only the prompt (and the head) learned, through the serving model code.

Loss: next-token cross-entropy on the target tokens only (generate); token head cross-entropy on every text
token (tag); sequence head at the last text token (classify), as the server applies them.
AdamW, linear warmup then linear or cosine decay, gradient clipping, a held-out evaluation each epoch,
early stopping on the task's metric; the best epoch's prompt is the one returned.
A caller may follow and steer a run through TrainHooks (the fine-tuning service: progress events, a checkpoint
per epoch to resume from, cancellation); the CLI passes none.
"""
from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from app.engine.model import Transformer
from app.engine.weights import LoadedModel, base_identity
from app.train.data import IGNORE, MAX_LENGTH, Example
from app.train.metrics import EntityScore
from app.train.prompt import TrainablePrompt, initial_embeddings
from prompt_store.format import Kind, PromptFile, Task, validate_prompt

log = logging.getLogger(__name__)

DEFAULT_LR = {Kind.PROMPT: 3e-2, Kind.PREFIX: 1e-2}  # prompt tuning wants a high lr (Lester et al.: 0.3, Adafactor)
DEFAULT_HEAD_LR = 1e-3
SCHEDULES = ("linear", "cosine")  # the learning rate's decay after warmup
MONITOR = {Task.GENERATE: "loss", Task.TAG: "f1", Task.CLASSIFY: "accuracy"}  # early stopping and best-epoch choice


@dataclass
class TrainConfig:
    task: str
    kind: str = Kind.PROMPT
    virtual_tokens: int = 20
    epochs: int = 3
    lr: float | None = None  # None: DEFAULT_LR[kind]
    head_lr: float = DEFAULT_HEAD_LR
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps
    schedule: str = "linear"  # "linear" | "cosine"
    clip: float = 1.0
    patience: int | None = None  # epochs without improvement before stopping
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (for budgets and tests)
    eval_batch_size: int = 32
    progress: bool = True

    def __post_init__(self):
        if self.task not in MONITOR:
            raise ValueError(f"unknown task {self.task!r}; expected generate, tag or classify")
        if self.kind not in DEFAULT_LR:
            raise ValueError(f"unknown prompt kind {self.kind!r}; expected 'prompt' or 'prefix'")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected 'linear' or 'cosine'")
        if self.virtual_tokens < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("virtual_tokens, epochs and batch_size must be at least 1")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.kind]


@dataclass
class TrainResult:
    prompt: TrainablePrompt
    metrics: dict  # the chosen epoch's held-out metrics
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss and held-out metrics
    steps: int = 0
    tokens: int = 0  # text tokens of the training batches run, over all steps


class TrainingStopped(Exception):
    """TrainHooks.stop said so; no result."""


@dataclass
class TrainHooks:
    on_step: Callable[[int, int, float, int], None] | None = None  # (step, total steps, batch loss, batch tokens)
    on_epoch: Callable[[dict, dict], None] | None = None  # (the epoch's record, a checkpoint: `resume` takes it)
    stop: Callable[[], bool] | None = None  # asked before each step; True raises TrainingStopped
    resume: dict | None = None  # a checkpoint given to on_epoch by an earlier run: it goes on from that epoch


def batch_tensors(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask, targets (IGNORE on padding) and lengths."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = True
        targets[row, :len(e.targets)] = torch.tensor(e.targets)
    lengths = mask.sum(1)
    return ids.to(device), mask.to(device), targets.to(device), lengths.to(device)


def task_outputs(model: Transformer, prompt: TrainablePrompt, ids, mask, targets, lengths, shared_prefix=False):
    """-> (summed loss, number of loss terms, logits of the scored positions, their targets)."""
    hidden = prompt.text_hidden(model, ids, mask, shared_prefix)
    if prompt.task == Task.GENERATE:
        scored = targets != IGNORE
        logits = model.logits(hidden[scored]).float()
        gold = targets[scored]
    elif prompt.task == Task.TAG:
        scored = mask
        logits = prompt.head_logits(hidden[scored])
        gold = targets[scored]
    else:
        last = hidden[torch.arange(len(ids), device=ids.device), lengths - 1]
        logits = prompt.head_logits(last)
        gold = targets[:, 0]
    loss = F.cross_entropy(logits, gold, reduction="sum")
    return loss, gold.numel(), logits, gold


def lr_lambda(total: int, warmup: float, schedule: str):
    warm = max(1, round(total * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def new_prompt(loaded: LoadedModel, config: TrainConfig, labels: list[str]) -> TrainablePrompt:
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the head's init
    embeddings = initial_embeddings(loaded.model, config.kind, config.virtual_tokens, generator)
    device = loaded.model.embed_tokens.weight.device
    return TrainablePrompt(loaded.args, config.kind, config.task, embeddings, len(labels)).to(device)


def train(loaded: LoadedModel, config: TrainConfig, labels: list[str], train_set: list[Example],
          heldout: list[Example], hooks: TrainHooks | None = None) -> TrainResult:
    hooks = hooks or TrainHooks()
    model = loaded.model.eval().requires_grad_(False)  # frozen: no base parameter is ever optimized
    device = model.embed_tokens.weight.device
    prompt = new_prompt(loaded, config, labels)
    groups = [{"params": [prompt.embeddings], "lr": config.lr}]
    if prompt.head is not None:
        groups.append({"params": list(prompt.head.parameters()), "lr": config.head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, config.warmup, config.schedule))
    rng = random.Random(config.seed)
    monitor = MONITOR[config.task]
    sign = -1 if monitor == "loss" else 1
    best, best_state, stale, step, history, tokens, first_epoch = None, None, 0, 0, [], 0, 1
    if hooks.resume is not None:
        state = hooks.resume
        prompt.load_state_dict(state["prompt"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.setstate(state["rng"])
        best, best_state, stale, step = state["best"], state["best_state"], state["stale"], state["step"]
        history, tokens, first_epoch = list(state["history"]), state["tokens"], state["epoch"] + 1
    for epoch in range(first_epoch, config.epochs + 1):
        if step >= total or (config.patience is not None and stale >= config.patience):
            break  # (a run resumed after its last epoch)
        order = list(range(len(train_set)))
        rng.shuffle(order)
        prompt.train()
        running, terms = 0.0, 0
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch}/{config.epochs}",
                   disable=not config.progress, leave=False)
        for start in bar:
            if step >= total:
                break
            if hooks.stop is not None and hooks.stop():
                raise TrainingStopped(f"stopped at step {step}")
            batch = batch_tensors([train_set[i] for i in order[start:start + config.batch_size]], device)
            loss_sum, n, _, _ = task_outputs(model, prompt, *batch)
            loss = loss_sum / max(n, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prompt.parameters(), config.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            running, terms = running + loss_sum.item(), terms + n
            batch_tokens = int(batch[1].sum())
            tokens += batch_tokens
            bar.set_postfix(loss=f"{running / max(terms, 1):.4f}")
            if hooks.on_step is not None:
                hooks.on_step(step, total, loss.item(), batch_tokens)
        bar.close()
        metrics = evaluate(model, prompt, heldout, labels, config.eval_batch_size) if heldout else {}
        record = {"epoch": epoch, "steps": step, "train_loss": running / max(terms, 1), **metrics}
        history.append(record)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in record.items()))
        score = sign * metrics[monitor] if metrics else -record["train_loss"]
        if best is None or score > best:
            best, best_state, stale = score, copy.deepcopy(prompt.state_dict()), 0
        else:
            stale += 1
        if hooks.on_epoch is not None:
            hooks.on_epoch(record, copy.deepcopy({  # a snapshot: the optimizer's state changes in place
                "epoch": epoch, "step": step, "prompt": prompt.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng.getstate(), "best": best, "best_state": best_state,
                "stale": stale, "history": history, "tokens": tokens}))
        if (config.patience is not None and stale >= config.patience) or step >= total:
            break
    prompt.load_state_dict(best_state)
    chosen = max(history, key=lambda r: sign * r[monitor] if monitor in r else -r["train_loss"])
    return TrainResult(prompt, {k: v for k, v in chosen.items() if k not in ("train_loss",)}, history, step, tokens)


@torch.no_grad()
def evaluate(model: Transformer, prompt: TrainablePrompt, examples: list[Example], labels: list[str],
             batch_size: int = 32) -> dict:
    """Held-out loss and the task's metrics: exact match of the greedy answer (generate; with teacher
    forcing, greedy decoding reproduces the target iff every target token is the argmax), entity-level
    precision/recall/F1 (tag), accuracy (classify)."""
    was_training = prompt.training
    prompt.eval()
    device = model.embed_tokens.weight.device
    loss, terms, correct_tokens, exact, entities = 0.0, 0, 0, 0, EntityScore()
    examples = sorted(examples, key=lambda e: len(e.input_ids))  # less padding; the metrics ignore order
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids, mask, targets, lengths = batch_tensors(chunk, device)
        loss_sum, n, logits, gold = task_outputs(model, prompt, ids, mask, targets, lengths, shared_prefix=True)
        loss, terms = loss + loss_sum.item(), terms + n
        hits = logits.argmax(-1) == gold
        correct_tokens += int(hits.sum())
        if prompt.task == Task.GENERATE:
            per_row = (targets != IGNORE).sum(1).tolist()
            exact += sum(bool(part.all()) for part in hits.split(per_row))
        elif prompt.task == Task.TAG:
            predicted = logits.argmax(-1).tolist()
            offset = 0
            for e in chunk:
                n_tok = len(e.input_ids)
                gold_tags = [labels[i] for i in e.targets[:n_tok]]
                entities.add(gold_tags, [labels[i] for i in predicted[offset:offset + n_tok]])
                offset += n_tok
    prompt.train(was_training)
    metrics = {"loss": loss / max(terms, 1), "examples": len(examples)}
    if prompt.task == Task.GENERATE:
        metrics.update(token_accuracy=correct_tokens / max(terms, 1), exact_match=exact / len(examples))
    elif prompt.task == Task.TAG:
        metrics.update(entities.result(), token_accuracy=correct_tokens / max(terms, 1))
    else:
        metrics.update(accuracy=correct_tokens / len(examples))
    return metrics


def to_prompt_file(loaded: LoadedModel, prompt: TrainablePrompt, name: str, labels: list[str],
                   description: str = "") -> PromptFile:
    head = prompt.head
    pf = PromptFile(
        name=name, kind=prompt.kind, task=prompt.task, num_virtual_tokens=prompt.num_virtual_tokens,
        labels=list(labels), description=description, base=base_identity(loaded),
        prompt_embeddings=prompt.embeddings.detach().float().cpu(),
        head_weight=None if head is None else head.weight.detach().float().cpu(),
        head_bias=None if head is None else head.bias.detach().float().cpu(),
        source="softserve-train", created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    validate_prompt(pf, base_identity(loaded))
    return pf


def from_prompt_file(loaded: LoadedModel, pf: PromptFile) -> TrainablePrompt:
    """A PromptFile back into the training module (for evaluation)."""
    validate_prompt(pf, base_identity(loaded))
    prompt = TrainablePrompt(loaded.args, pf.kind, pf.task, pf.prompt_embeddings, len(pf.labels))
    if prompt.head is not None:
        if pf.head_weight is None:
            raise ValueError("evaluating a classify prompt without a head is not supported; it scores label words")
        prompt.head.weight.data.copy_(pf.head_weight)
        prompt.head.bias.data.copy_(pf.head_bias if pf.head_bias is not None else torch.zeros(len(pf.labels)))
    return prompt.to(loaded.model.embed_tokens.weight.device)


def evaluate_prompt(loaded: LoadedModel, tokenizer, prompt_file, jsonl_path, limit: int | None = None,
                    max_length: int = MAX_LENGTH, batch_size: int = TrainConfig.eval_batch_size) -> dict:
    """Score a prompt file (PromptFile, bytes or path) on the first `limit` lines of a JSONL file."""
    from pathlib import Path

    from app.train.data import load_examples, read_jsonl
    from prompt_store.format import load_prompt_bytes

    if isinstance(prompt_file, (str, Path)):
        prompt_file = Path(prompt_file).read_bytes()
    pf = load_prompt_bytes(prompt_file) if isinstance(prompt_file, (bytes, bytearray)) else prompt_file
    rows = read_jsonl(Path(jsonl_path))[:limit]
    examples = load_examples(jsonl_path, pf.task, tokenizer, list(pf.labels), max_length, rows=rows)
    prompt = from_prompt_file(loaded, pf)
    return evaluate(loaded.model, prompt, examples, list(pf.labels), batch_size)
