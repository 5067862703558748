"""`softserve prompts ...`: list, show, remove and import prompts in a store folder.

app/cli.py wires it up: add_prompt_commands(subparsers), then run_prompts_command(args, base_loader) with
args.store set (to --store, else the server's store folder, Settings.prompt_store).
base_loader() is called only by commands that write (import-peft): reading a store needs no model.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from prompt_store.format import BaseIdentity, PromptFormatError
from prompt_store.peft_import import import_peft_dir
from prompt_store.registry import PromptExists, PromptNotFound, PromptRegistry


def add_prompt_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # --store on every subcommand, so it may be given after the subcommand name as users expect
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", default=None,
                       help="prompt store folder (default: the server's, SOFTSERVE_PROMPT_STORE)")

    prompts = subparsers.add_parser("prompts", help="manage the task prompts in a prompt store")
    actions = prompts.add_subparsers(dest="prompts_action", required=True)
    actions.add_parser("list", parents=[store], help="list prompts with their current version")
    show = actions.add_parser("show", parents=[store], help="show one prompt in detail")
    show.add_argument("name")
    show.add_argument("--version", type=int, default=None)
    rm = actions.add_parser("rm", parents=[store], help="remove a prompt and all its versions")
    rm.add_argument("name")
    imp = actions.add_parser("import-peft", parents=[store], help="import a PEFT prompt-learning adapter folder")
    imp.add_argument("adapter_dir")
    imp.add_argument("--name", required=True)
    imp.add_argument("--labels", default=None, help="comma-separated label names, in head row order")
    imp.add_argument("--description", default="")
    return prompts


def run_prompts_command(args: argparse.Namespace, base_loader: Callable[[], BaseIdentity]) -> int:
    """Run the parsed `prompts` subcommand; returns the process exit code."""
    try:
        if args.prompts_action == "import-peft":
            return _import_peft(args, base_loader())
        registry = PromptRegistry(args.store, base=None)
        if args.prompts_action == "list":
            return _list(registry)
        if args.prompts_action == "show":
            return _show(registry, args.name, args.version)
        if args.prompts_action == "rm":
            registry.delete(args.name)
            print(f"removed {args.name}")
            return 0
    except (PromptFormatError, PromptNotFound, PromptExists) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    raise ValueError(f"unknown prompts command {args.prompts_action!r}")


def _import_peft(args: argparse.Namespace, base: BaseIdentity) -> int:
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    pf = import_peft_dir(args.adapter_dir, args.name, base, labels=labels, description=args.description)
    stored = PromptRegistry(args.store, base=base).add(pf)
    print(
        f"stored {stored.name} v{stored.version}: {stored.kind}, {stored.task}, "
        f"{stored.num_virtual_tokens} virtual tokens ({stored.source})"
    )
    return 0


def _list(registry: PromptRegistry) -> int:
    rows = [("NAME", "VERSION", "KIND", "TASK", "TOKENS", "LABELS", "DESCRIPTION")]
    for info in registry.list():
        rows.append(
            (
                info.name,
                str(info.version),
                info.kind,
                info.task,
                str(info.num_virtual_tokens),
                ",".join(info.labels),
                info.description,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _show(registry: PromptRegistry, name: str, version: int | None) -> int:
    pf = registry.get(name, version)
    head = "none" if pf.head_weight is None else f"{list(pf.head_weight.shape)}, bias: {pf.head_bias is not None}"
    lines = {
        "name": pf.name,
        "version": f"{pf.version} (stored: {', '.join(map(str, registry.versions(name)))})",
        "kind": pf.kind,
        "task": pf.task,
        "virtual tokens": pf.num_virtual_tokens,
        "embeddings": list(pf.prompt_embeddings.shape),
        "labels": ", ".join(pf.labels) or "-",
        "head": head,
        "description": pf.description or "-",
        "source": pf.source,
        "created at": pf.created_at,
        "file": registry.path(name, version),
        "base": ", ".join(f"{key}={value}" for key, value in pf.base.to_dict().items()),
    }
    for key, value in lines.items():
        print(f"{key + ':':<16}{value}")
    return 0
