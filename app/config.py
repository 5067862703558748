"""Every setting in one object, read from SOFTSERVE_* environment variables and overridden by CLI flags.

The README's settings table lists the same fields; `Settings` is passed down, never read globally.
The command line builds it once (`environment_settings()`), then `with_flags` applies the flags.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engine.config import DEFAULT_CACHE_DIR, WEIGHTS_READ_TIMEOUT_S, EngineConfig, EngineKnobs
from prompt_store.format import MAX_VIRTUAL_TOKENS


class Settings(EngineKnobs, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTSERVE_", protected_namespaces=())

    # the model
    model: str = Field("default", description="'default' (SmolLM2-135M-Instruct), an HF model directory, a .gguf file, "
                                         "or a Hugging Face hub id (HF_HUB_OFFLINE=1: from the hub cache only)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and KV dtype; auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    served_model_name: str | None = Field(
        None, description="the base model's id in /v1/models and `model`; unset: its hub id (the default model's, "
                          "or a directory's config `_name_or_path`), else the folder name")
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="where the default model is fetched and GGUF files are converted")
    weights_read_timeout_s: float = Field(
        WEIGHTS_READ_TIMEOUT_S, gt=0, description="loading fails when a weights file gives no bytes for this long "
                                                  "(a FIFO nobody writes, a hung network disk)")
    # the server
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line (app/logs.py)")
    # prompts
    prompt_store: Path = Field(Path("~/.local/share/softserve/prompts"), description="the prompt registry's folder")
    example_prompts: bool = Field(True, description="add the shipped chat, ner and spam prompts when their names are free")
    example_prompts_dir: Path = Field(Path(__file__).resolve().parents[1] / "examples" / "prompts",
                                      description="where the shipped example prompt files are")
    watch_interval_s: float = Field(2.0, gt=0, description="how often the store folder is rescanned for other replicas' changes")
    max_virtual_tokens: int = Field(MAX_VIRTUAL_TOKENS, ge=1)
    # the engine: EngineKnobs' fields, inherited (max_seq_len, block_size, prefix_caching, max_batched_tokens, max_num_seqs,
    # max_waiting, decode_attention, layer_ops, linear_kernel), and these three in a person's units (`engine` converts them)
    kv_cache_gb: float | None = Field(None, gt=0, description="KV cache budget; unset: 90% of free GPU memory, or 2 GiB on CPU")
    prompt_cache_mb: float = Field(1024, gt=0, description="CPU memory for loaded prompts (files read, prefixes computed on first use; older versions kept for name@N and split requests count too); beyond it the least recently used are unloaded")
    cuda_graphs: bool = Field(True, description="on CUDA, replay decode steps as captured CUDA graphs (captured at start-up)")
    request_timeout_s: float = Field(300.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0, description="on shutdown, how long in-flight requests may finish")
    # the API
    max_request_mb: float = Field(4.0, gt=0, description="largest request body except prompt uploads (413 above)")
    max_upload_mb: float = Field(64.0, gt=0, description="largest prompt upload body (PUT /v1/prompts/{name}; 413 above)")
    tokenizer_threads: int = Field(2, ge=1, description="threads that tokenize and render chat templates, off the event loop")
    max_inputs_per_request: int = Field(64, ge=1, description="inputs in one /v1/generate, /v1/tag or /v1/classify call (422 above)")
    max_tokens_per_request: int = Field(65536, ge=1, description="input tokens plus max_tokens, summed over a request's inputs (422 above)")
    # structured output: the price check before compiling (app/api/grammar_price.py) and the compile pool (app/grammars.py)
    grammar_max_bytes: int = Field(16384, ge=1, description="a grammar's source: a schema's JSON text, a regex, the choices (400 above)")
    grammar_max_enum_values: int = Field(1024, ge=1, description="enum and const values of a schema, or guided_choice strings (400 above)")
    grammar_max_properties: int = Field(256, ge=1, description="object properties of a schema, all objects together (400 above)")
    grammar_max_depth: int = Field(32, ge=1, description="levels of JSON nesting of a schema (400 above)")
    grammar_max_regex_chars: int = Field(1024, ge=1, description="characters of one regex: guided_regex or a schema's pattern (400 above)")
    grammar_max_repeat: int = Field(1024, ge=1, description="regex repetition counts {m,n} of a grammar, added up (400 above)")
    grammar_compile_threads: int = Field(1, ge=1, description="threads that compile grammars, at the lowest CPU priority")
    grammar_max_pending: int = Field(16, ge=1, description="grammar compiles waiting or running at once (429 above)")
    grammar_cache_mb: float = Field(64.0, gt=0, description="memory for compiled grammars kept for reuse (least recently used dropped)")
    client_timeout_s: float = Field(10.0, gt=0, description="a request's line and headers must arrive within this long; its body may pause no longer")
    admin_token: str | None = Field(None, description="bearer token for prompt changes and the fine-tuning routes; unset: only loopback clients may use them")
    api_keys: str = Field("", description="comma-separated keys for the inference routes; empty: open")
    # fine-tuning: /v1/files and /v1/fine_tuning/jobs (app/finetune)
    finetune_dir: Path | None = Field(None, description="uploaded files, the job database and checkpoints; unset: <prompt_store>/_finetune, so replicas sharing the store share jobs")
    finetune_worker: bool = Field(True, description="this replica runs queued jobs (false: it only accepts and reports them)")
    finetune_max_file_mb: float = Field(64.0, gt=0, description="largest file upload body (POST /v1/files; 413 above)")
    finetune_max_storage_mb: float = Field(1024.0, gt=0, description="all uploaded files together (429 storage_full above)")
    finetune_max_queued: int = Field(8, ge=1, description="jobs waiting to run, store-wide (429 above)")
    finetune_max_running: int = Field(1, ge=1, description="jobs training at once, store-wide")
    finetune_max_job_s: float = Field(3600.0, gt=0, description="a job still training this long after it started is stopped and failed")
    finetune_threads: int = Field(1, ge=1, description="torch CPU threads of a training process (which runs at the lowest CPU priority)")
    finetune_gpu_memory_fraction: float = Field(0.25, gt=0, le=1, description="on CUDA, the share of the GPU's memory a training process may allocate")
    finetune_lease_s: float = Field(30.0, gt=0, description="a running job's lease: its replica renews it; once it expires (a killed replica), another replica or a restart resumes the job")
    finetune_max_attempts: int = Field(3, ge=1, description="times a job is started (resumes after a lost lease included) before it is failed")
    finetune_poll_s: float = Field(1.0, gt=0, description="how often a replica looks for queued jobs")

    @field_validator("cache_dir", "prompt_store", "finetune_dir")
    @classmethod
    def _expand(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser()

    @property
    def finetune_path(self) -> Path:
        """Inside the store, so that a volume shared by replicas carries the jobs too; `_finetune` is no valid
        prompt name, so the registry never takes the folder for a prompt (nor, not being hidden, for its temp files)."""
        return self.finetune_dir or self.prompt_store / "_finetune"

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    def resolved_device(self) -> str:
        from app.engine.weights import resolve_device

        return resolve_device(self.device)

    def resolved_dtype(self):
        """The torch dtype of the weights and the KV cache."""
        from app.engine.weights import resolve_dtype

        return resolve_dtype(self.dtype, self.resolved_device())

    @property
    def engine(self) -> EngineConfig:
        """The engine's config: the knobs as they are, the three of other units converted (here only)."""
        knobs = self.model_dump(include=set(EngineKnobs.model_fields))
        return EngineConfig(**knobs, kv_cache_bytes=None if self.kv_cache_gb is None else int(self.kv_cache_gb * (1 << 30)),
                            prompt_cache_bytes=int(self.prompt_cache_mb * (1 << 20)),
                            static_decode=None if self.cuda_graphs else False)

    def with_flags(self, args: argparse.Namespace, **extra) -> Settings:
        """These settings with the flags that were given (and `extra`) on top, validated like the environment."""
        overrides = {field: getattr(args, field) for field, _ in FLAGS.values() if getattr(args, field, None) is not None}
        return Settings.model_validate({**self.model_dump(), **overrides, **extra})


FLAGS = {  # flag -> (Settings field, help); the values are validated by Settings, as the environment's are
    "--model": ("model", "'default', an HF model directory, a .gguf file, or a Hugging Face hub id"),
    "--served-model-name": ("served_model_name", "the base model's id in /v1/models"),
    "--dtype": ("dtype", "auto | float32 | bfloat16 | float16"),
    "--device": ("device", "auto | cpu | cuda | cuda:N"),
    "--host": ("host", "address to listen on"),
    "--port": ("port", "port to listen on"),
    "--cache-dir": ("cache_dir", "where the default model is fetched and GGUF files converted"),
    "--prompt-store": ("prompt_store", "the prompt registry's folder"),
    "--max-seq-len": ("max_seq_len", "positions per request"),
    "--kv-cache-gb": ("kv_cache_gb", "KV cache budget in GiB"),
    "--log-level": ("log_level", "debug | info | warning | error"),
    "--log-format": ("log_format", "text | json"),
}


def add_setting_flags(parser: argparse.ArgumentParser, names=tuple(FLAGS)) -> None:
    for flag in names:
        field, help_text = FLAGS[flag]
        parser.add_argument(flag, dest=field, default=None, help=f"{help_text} (env SOFTSERVE_{field.upper()})")


def environment_settings() -> Settings:
    """The settings of the SOFTSERVE_* environment, read once per process (by the CLI, or by the app factory
    under `uvicorn --factory`). A bad value ends the process with one line naming it, and exit code 2."""
    try:
        return Settings()
    except ValidationError as e:
        print(f"softserve: {describe(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def describe(error: ValidationError) -> str:
    """A validation error as one line that names the flag and the environment variable."""
    flags = {field: flag for flag, (field, _) in FLAGS.items()}
    parts = []
    for e in error.errors():
        field = ".".join(map(str, e["loc"]))
        where = " / ".join(filter(None, (flags.get(field), f"SOFTSERVE_{field.upper()}")))
        parts.append(f"{field} ({where}): {e['msg']}, got {e['input']!r}")
    return "bad setting: " + "; ".join(parts)
