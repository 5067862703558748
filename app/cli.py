"""`softserve serve | fetch-model | prompts | train | bench`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from app.config import Settings
from app.engine.weights import DEFAULT_MODEL, ModelLoadError

SERVE_FLAGS = {  # flag -> (Settings field, type, help)
    "--model": ("model", str, "'default', an HF model directory, or a .gguf file"),
    "--dtype": ("dtype", str, "auto | float32 | bfloat16 | float16"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N"),
    "--host": ("host", str, "address to listen on"),
    "--port": ("port", int, "port to listen on"),
    "--cache-dir": ("cache_dir", str, "where the default model is fetched and GGUF files converted"),
    "--prompt-store": ("prompt_store", str, "the prompt registry's folder"),
    "--max-seq-len": ("max_seq_len", int, "positions per request"),
    "--kv-cache-gb": ("kv_cache_gb", float, "KV cache budget in GiB"),
    "--log-level": ("log_level", str, "debug | info | warning | error"),
}


def settings_from(args: argparse.Namespace, **extra) -> Settings:
    """Environment first (pydantic-settings reads SOFTSERVE_*), then the flags that were given."""
    overrides = {field: getattr(args, field) for field, _, _ in SERVE_FLAGS.values()
                 if getattr(args, field, None) is not None}
    return Settings(**overrides, **extra)


def add_model_flags(parser: argparse.ArgumentParser, names=tuple(SERVE_FLAGS)) -> None:
    for flag in names:
        field, kind, help_text = SERVE_FLAGS[flag]
        parser.add_argument(flag, dest=field, type=kind, default=None, help=f"{help_text} (env SOFTSERVE_{field.upper()})")


def cmd_serve(args) -> int:
    import uvicorn

    from app.server import create_app

    settings = settings_from(args, example_prompts=False) if args.no_examples else settings_from(args)
    if settings.model != DEFAULT_MODEL and not Path(settings.model).expanduser().exists():
        raise ModelLoadError(f"model path {settings.model!r} does not exist (give an HF model directory, "
                             f"a .gguf file, or 'default')")
    # access_log=False: softserve's middleware already logs one line per request (with its request id).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5)
    return 0


def cmd_fetch_model(args) -> int:
    from app.engine.weights import load_model, resolve_dtype

    settings = settings_from(args)
    loaded = load_model(settings.model, resolve_dtype("float32"), "cpu", settings.cache_dir)
    print(f"{loaded.name}: ready in {loaded.directory} (fingerprint {loaded.fingerprint})")
    return 0


def cmd_prompts(args) -> int:
    """The base identity (for import-peft) is the one of SOFTSERVE_MODEL, as the server would load it."""
    import torch

    from app.engine.weights import load_model
    from app.services import base_identity
    from prompt_store.cli import run_prompts_command

    def base_loader():
        settings = Settings()
        return base_identity(load_model(settings.model, torch.float32, "cpu", settings.cache_dir))

    return run_prompts_command(args, base_loader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="softserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    add_model_flags(serve)
    serve.add_argument("--no-examples", action="store_true", help="do not add the shipped example prompts")
    serve.set_defaults(func=cmd_serve)

    fetch = sub.add_parser("fetch-model", help="download and convert the model once (for images, offline use)")
    add_model_flags(fetch, ("--model", "--cache-dir"))
    fetch.set_defaults(func=cmd_fetch_model)

    from prompt_store.cli import add_prompt_commands

    add_prompt_commands(sub, default_store=str(Settings().prompt_store)).set_defaults(func=cmd_prompts)

    from app.bench.cli import add_bench_command

    add_bench_command(sub)

    from app.train.cli import add_train_command

    add_train_command(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", None) and args.log_level.upper() or logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except (ModelLoadError, ValidationError) as e:
        print(f"softserve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
