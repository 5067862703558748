"""`softserve serve | fetch-model | prompts | train | bench`.

The settings are built once, here: from the SOFTSERVE_* environment before the flags are parsed (so a bad
variable is reported even with --help), then with the flags on top; every subcommand gets that one object.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from app.config import Settings, add_setting_flags, describe, environment_settings
from app.engine.weights import DEFAULT_MODEL, ModelLoadError


def cmd_serve(args, settings: Settings) -> int:
    import uvicorn

    from app.http_protocol import HTTPProtocol
    from app.server import create_app

    if settings.model != DEFAULT_MODEL and not Path(settings.model).expanduser().exists():
        raise ModelLoadError(f"model path {settings.model!r} does not exist (give an HF model directory, "
                             f"a .gguf file, or 'default')")
    # access_log=False: softserve's middleware already logs one line per request (with its request id).
    # http: uvicorn's protocol with time limits for stalled clients (SOFTSERVE_CLIENT_TIMEOUT_S).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                http=HTTPProtocol, access_log=False, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5)
    return 0


def cmd_fetch_model(args, settings: Settings) -> int:
    import torch

    from app.engine.weights import load_model

    loaded = load_model(settings.model, torch.float32, "cpu", settings.cache_dir)
    print(f"{loaded.name}: ready in {loaded.directory} (fingerprint {loaded.fingerprint})")
    return 0


def cmd_prompts(args, settings: Settings) -> int:
    """The store is the server's unless --store is given; the base identity (for import-peft) is the one of
    the configured model, as the server would load it."""
    import torch

    from app.engine.weights import base_identity, load_model
    from prompt_store.cli import run_prompts_command

    def base_loader():
        return base_identity(load_model(settings.model, torch.float32, "cpu", settings.cache_dir))

    args.store = args.store or settings.prompt_store
    return run_prompts_command(args, base_loader)


def build_parser() -> argparse.ArgumentParser:
    from app.bench.cli import add_bench_command
    from app.train.cli import add_train_command
    from prompt_store.cli import add_prompt_commands

    parser = argparse.ArgumentParser(prog="softserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    add_setting_flags(serve)
    serve.add_argument("--no-examples", action="store_true", help="do not add the shipped example prompts")
    serve.set_defaults(func=cmd_serve)

    fetch = sub.add_parser("fetch-model", help="download and convert the model once (for images, offline use)")
    add_setting_flags(fetch, ("--model", "--cache-dir"))
    fetch.set_defaults(func=cmd_fetch_model)

    add_prompt_commands(sub).set_defaults(func=cmd_prompts)
    add_bench_command(sub)
    add_train_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    settings = environment_settings()
    try:
        args = build_parser().parse_args(argv)
        settings = settings.with_flags(args, **({"example_prompts": False} if getattr(args, "no_examples", False)
                                                else {}))
    except ValidationError as e:
        print(f"softserve: {describe(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args, settings)
    except ModelLoadError as e:
        print(f"softserve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
