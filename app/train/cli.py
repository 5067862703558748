"""`softserve train DATA.jsonl --name NAME ...`: train a prompt, write the prompt file, optionally push it."""
from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

from app.config import Settings, add_setting_flags
from app.train.data import MAX_LENGTH
from app.train.trainer import DEFAULT_LR, SCHEDULES, TrainConfig
from prompt_store.format import KINDS, TASKS, Task

log = logging.getLogger(__name__)


def add_train_command(sub) -> None:
    """The flags' defaults are TrainConfig's (and MAX_LENGTH): written there, once."""
    D = TrainConfig  # noqa: N806
    p = sub.add_parser("train", help="learn a task prompt (and head) on a JSONL file; see docs/TRAINING.md")
    p.add_argument("data", type=Path, help="training data, JSON Lines")
    p.add_argument("--name", required=True, help="the prompt's name (the API's model id)")
    p.add_argument("--task", choices=TASKS, help="default: inferred from the first line")
    p.add_argument("--kind", choices=KINDS, default=D.kind.value,
                   help=f"prompt: shallow [P, hidden] embeddings; prefix: deep per-layer K,V (default: {D.kind})")
    p.add_argument("--virtual-tokens", type=int, default=D.virtual_tokens,
                   help=f"P, the number of virtual tokens (default: {D.virtual_tokens})")
    p.add_argument("--out", type=Path, help="the prompt file to write (default: NAME.safetensors)")
    p.add_argument("--metrics-out", type=Path,
                   help="JSON of the final held-out metrics (default: OUT with suffix .metrics.json)")
    p.add_argument("--description", default="", help="stored in the prompt file")
    p.add_argument("--labels", help="comma-separated labels (classify) or entity types (tag); "
                                    "default: those in the training data")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--heldout", type=Path, help="held-out JSONL evaluated each epoch")
    held.add_argument("--heldout-fraction", type=float, default=0.1,
                      help="fraction of DATA held out when --heldout is not given (default: 0.1)")
    p.add_argument("--epochs", type=int, default=D.epochs, help=f"(default: {D.epochs})")
    p.add_argument("--lr", type=float, help="prompt learning rate (default: "
                   + ", ".join(f"{lr:g} for {kind}" for kind, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--head-lr", type=float, default=D.head_lr, help=f"head learning rate (default: {D.head_lr:g})")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help=f"(default: {D.batch_size})")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH,
                   help=f"text tokens per example; longer ones are cut (default: {MAX_LENGTH})")
    p.add_argument("--warmup", type=float, default=D.warmup,
                   help=f"warmup, as a fraction of the steps (default: {D.warmup})")
    p.add_argument("--schedule", choices=SCHEDULES, default=D.schedule, help=f"decay after warmup (default: {D.schedule})")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay, help=f"(default: {D.weight_decay})")
    p.add_argument("--clip", type=float, default=D.clip, help=f"gradient norm clipping (default: {D.clip})")
    p.add_argument("--patience", type=int, help="stop after this many epochs without held-out improvement")
    p.add_argument("--seed", type=int, default=D.seed, help=f"(default: {D.seed})")
    p.add_argument("--limit", type=int, help="use only the first N training examples (after shuffling)")
    p.add_argument("--heldout-limit", type=int, help="evaluate on only the first N held-out examples")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--push", metavar="URL", help="upload to a running server: PUT URL/v1/prompts/NAME "
                                                 "(Authorization from SOFTSERVE_ADMIN_TOKEN)")
    add_setting_flags(p, ("--model", "--dtype", "--device", "--cache-dir"))
    p.set_defaults(func=cmd_train)


def cmd_train(args, settings: Settings) -> int:
    from app.train.data import DataError
    from prompt_store.format import PromptFormatError

    try:
        return run_train(args, settings)
    except (DataError, PromptFormatError) as e:
        print(f"softserve train: {e}", file=sys.stderr)
        return 2


def run_train(args, settings: Settings) -> int:
    """Split the data, load the model, train, write the prompt file and its metrics, push it if asked."""
    import torch

    from app.engine.tokenizer import Tokenizer
    from app.engine.weights import load_model
    from app.train.trainer import train
    from prompt_store.format import validate_name

    validate_name(args.name)
    if args.threads:
        torch.set_num_threads(args.threads)
    task, rows, heldout_rows, labels = split_data(args)
    loaded = load_model(settings.model, settings.resolved_dtype(), settings.resolved_device(), settings.cache_dir)
    train_set, heldout = tokenize_data(args, task, labels, Tokenizer(loaded.directory), rows, heldout_rows)
    log.info("training a %s prompt (%s, P=%d) on %d examples, %d held out, labels %s", task, args.kind,
             args.virtual_tokens, len(train_set), len(heldout), labels)
    result = train(loaded, train_config(args, task), labels, train_set, heldout)
    data = write_outputs(args, task, loaded, labels, result, len(train_set))
    if args.push:
        return push(args.push, args.name, data, settings.admin_token)
    return 0


def split_data(args) -> tuple[str, list, list, list[str]]:
    """The task, the training and held-out rows (shuffled, split, cut to --limit / --heldout-limit) and the
    labels (given, else those of every training line before --limit)."""
    from app.train.data import DataError, bio_labels, infer_labels, read_jsonl

    rows = read_jsonl(args.data)
    task = args.task or infer_task(rows[0][1], args.data, rows[0][0])
    heldout_rows = read_jsonl(args.heldout) if args.heldout else None
    random.Random(args.seed).shuffle(rows)
    if heldout_rows is None:
        if not 0 < args.heldout_fraction < 1:
            raise DataError("--heldout-fraction must be between 0 and 1 (or give --heldout FILE)")
        cut = max(1, round(len(rows) * args.heldout_fraction))
        if cut >= len(rows):
            raise DataError(f"{args.data}: too few examples ({len(rows)}) to hold out a fraction")
        heldout_rows, rows = rows[:cut], rows[cut:]
    if args.labels:
        given = [x.strip() for x in args.labels.split(",") if x.strip()]
        labels = bio_labels(given) if task == Task.TAG else sorted(set(given))
    else:
        labels = infer_labels(task, rows, args.data)
    return task, rows[:args.limit], heldout_rows[:args.heldout_limit], labels


def tokenize_data(args, task: str, labels: list[str], tokenizer, rows: list, heldout_rows: list) -> tuple[list, list]:
    from app.train.data import load_examples

    train_set = load_examples(args.data, task, tokenizer, labels, args.max_length, rows=rows)
    heldout = load_examples(args.heldout or args.data, task, tokenizer, labels, args.max_length, rows=heldout_rows)
    return train_set, heldout


def train_config(args, task: str):
    return TrainConfig(task=task, kind=args.kind, virtual_tokens=args.virtual_tokens, epochs=args.epochs,
                       lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size,
                       weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule,
                       clip=args.clip, patience=args.patience, seed=args.seed, max_steps=args.max_steps)


def write_outputs(args, task: str, loaded, labels: list[str], result, train_examples: int) -> bytes:
    """The prompt file (--out) and its metrics (--metrics-out); returns the file's bytes."""
    from app.train.trainer import to_prompt_file
    from prompt_store.format import dump_prompt

    data = dump_prompt(to_prompt_file(loaded, result.prompt, args.name, labels, args.description))
    out = args.out or Path(f"{args.name}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    metrics_out = args.metrics_out or out.with_suffix(".metrics.json")
    summary = {"name": args.name, "task": task, "kind": args.kind, "virtual_tokens": args.virtual_tokens,
               "train_examples": train_examples, "steps": result.steps, "heldout": result.metrics,
               "history": result.history}
    metrics_out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} ({len(data)} bytes); held-out: "
          + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if isinstance(v, float)))
    return data


def infer_task(row: dict, path: Path, line: int) -> str:
    from app.train.data import DataError

    if "messages" in row or "prompt" in row or "completion" in row:
        return Task.GENERATE.value
    if "entities" in row:
        return Task.TAG.value
    if "label" in row:
        return Task.CLASSIFY.value
    raise DataError(f"{path}:{line}: cannot tell the task from this line (expected messages, prompt/completion, "
                    f"text+entities or text+label); pass --task")


def push(url: str, name: str, data: bytes, token: str | None) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = f"{url.rstrip('/')}/v1/prompts/{name}"
    try:
        response = httpx.put(target, files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
                             headers=headers, timeout=60)
    except httpx.HTTPError as e:
        print(f"softserve train: could not push to {target}: {e}", file=sys.stderr)
        return 1
    if response.is_error:
        print(f"softserve train: {target} answered {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    print(f"pushed {name} to {target}: {response.status_code} {response.text}")
    return 0
