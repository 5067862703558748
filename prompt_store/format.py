"""The softserve prompt file: one safetensors file per prompt version.

Tensors: `prompt_embeddings` and, for tasks with a head, `head.weight` / `head.bias`, all float32.
Everything else lives in the safetensors metadata under `softserve.*` keys (see docs/PROMPT_FORMAT.md).
Shapes follow PEFT so that an adapter imports without reshaping:
  shallow ("prompt"): [P, hidden]
  deep ("prefix"):    [P, num_layers * 2 * num_kv_heads * head_dim]
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from app.engine.request import Task  # what the engine runs on; imported from here by the store's users

FORMAT_VERSION = 1
MAX_VIRTUAL_TOKENS = 512  # the default limit; a server may lower or raise it (SOFTSERVE_MAX_VIRTUAL_TOKENS)
# Constants, not settings: every replica of a shared store must accept the same files.
MAX_DESCRIPTION_CHARS = 4096  # a description is shown in every listing of prompts
MAX_METADATA_BYTES = 256 << 10  # a prompt file's metadata (keys + values, UTF-8), or an adapter_config.json
MAX_JSON_DEPTH = 32  # nesting of a JSON metadata value (softserve.labels, softserve.base) or adapter_config.json


class Kind(StrEnum):
    """A shallow prompt (input embeddings) or a deep prefix (per-layer K,V)."""
    PROMPT = "prompt"
    PREFIX = "prefix"


KINDS = tuple(kind.value for kind in Kind)
TASKS = tuple(task.value for task in Task)
BASE_MODEL = "base"  # the bare model's name in the API (`model`, `prompt`), so no prompt's
# Matched with fullmatch: `$` alone would accept a trailing newline ("evil\n" -> a folder named so).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

EMBEDDINGS_KEY = "prompt_embeddings"
HEAD_WEIGHT_KEY = "head.weight"
HEAD_BIAS_KEY = "head.bias"
META_PREFIX = "softserve."

# torch.save writes a zip archive (new format) or a bare pickle stream (legacy / protocol >= 2).
PICKLE_MAGICS = (b"PK\x03\x04", b"\x80")


def embedding_width(kind: Kind, shape) -> int:
    """Width of one row of prompt_embeddings for a model `shape` (a BaseIdentity or the engine's ModelArgs):
    a shallow prompt is hidden_size wide, a deep prefix holds K and V for every layer (PEFT layout)."""
    if kind == Kind.PROMPT:
        return shape.hidden_size
    return shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim


class PromptFormatError(ValueError):
    """A prompt file, adapter or name was refused; the message says why."""


@dataclass(frozen=True)
class BaseIdentity:
    """What a prompt was trained against; a prompt only runs on a base with the same identity."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseIdentity:
        sizes = ("hidden_size", "num_layers", "num_kv_heads", "head_dim", "vocab_size")
        try:
            return cls(
                architecture=str(data["architecture"]),
                **{size: int(data[size]) for size in sizes},
                fingerprint=str(data["fingerprint"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(Infinity)
            raise PromptFormatError(f"invalid base identity {data!r}: {exc}") from exc

    def mismatch(self, other: BaseIdentity) -> str | None:
        """Call as `prompt_base.mismatch(server_base)`: the first difference as a sentence, or None."""
        for field in fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine == theirs:
                continue
            if field.name == "fingerprint":
                return f"prompt was trained for another base model (fingerprint {mine} != {theirs})"
            return (
                f"prompt was trained for a base with {field.name}={mine}, "
                f"this server's base has {field.name}={theirs}"
            )
        return None


@dataclass
class PromptFile:
    """One version of one task prompt, as stored on disk."""

    name: str
    kind: Kind
    task: Task
    num_virtual_tokens: int
    labels: list[str]
    description: str
    base: BaseIdentity
    prompt_embeddings: torch.Tensor  # shallow [P, hidden]; deep [P, num_layers*2*num_kv_heads*head_dim]
    head_weight: torch.Tensor | None = None  # [num_labels, hidden]
    head_bias: torch.Tensor | None = None  # [num_labels]
    source: str = "softserve-train"
    version: int = 0  # assigned by the registry
    created_at: str = ""
    # sha256 of the stored file's bytes, set whenever a file is read or written: tells two uploads that got
    # the same version number apart (a prompt deleted and re-created elsewhere).
    digest: str = ""


    @property
    def meta(self) -> PromptMeta:
        return PromptMeta(self.name, self.kind, self.task, self.num_virtual_tokens, tuple(self.labels),
                          self.description, self.source, self.version, self.created_at, self.digest)


@dataclass(frozen=True)
class PromptMeta:
    """A prompt file's fields without its tensors: what an index of thousands of prompts holds."""

    name: str
    kind: Kind
    task: Task
    num_virtual_tokens: int
    labels: tuple[str, ...]
    description: str
    source: str
    version: int
    created_at: str
    digest: str


def all_finite(tensor: torch.Tensor) -> bool:
    # numpy, single-threaded: torch's CPU thread pool made this check ~30 ms per prompt on a busy 2-core
    # machine (against 0.06 ms), which made indexing a store of 10,000 prompts take minutes.
    return bool(np.isfinite(tensor.detach().cpu().float().numpy()).all())


def validate_name(name: str) -> None:
    """Names become folder names and API model ids, so only a safe, short alphabet is accepted."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise PromptFormatError(
            f"invalid prompt name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    if name == BASE_MODEL:
        raise PromptFormatError(f"prompt name {name!r} is reserved")


def validate_prompt(pf: PromptFile, base: BaseIdentity | None, max_virtual_tokens: int = MAX_VIRTUAL_TOKENS) -> None:
    """Raise PromptFormatError naming the first problem. With base=None the base-dependent checks are skipped."""
    validate_name(pf.name)
    if pf.kind not in KINDS:
        raise PromptFormatError(f"unknown prompt kind {pf.kind!r}; expected one of {', '.join(KINDS)}")
    if pf.task not in TASKS:
        raise PromptFormatError(f"unknown task {pf.task!r}; expected one of {', '.join(TASKS)}")
    if base is not None:
        problem = pf.base.mismatch(base)
        if problem:
            raise PromptFormatError(problem)
    _validate_embeddings(pf, max_virtual_tokens)
    if base is not None:
        _validate_width(pf, base)
    _validate_labels_and_head(pf)
    _validate_metadata(pf)


def _validate_metadata(pf: PromptFile) -> None:
    """The description and the whole metadata within their limits (a stored file must be readable again)."""
    if not isinstance(pf.description, str):
        raise PromptFormatError("description must be text")
    if len(pf.description) > MAX_DESCRIPTION_CHARS:
        raise PromptFormatError(f"description is {len(pf.description)} characters long; the limit is "
                                f"{MAX_DESCRIPTION_CHARS} (MAX_DESCRIPTION_CHARS)")
    check_metadata_size(_metadata(pf))


def check_metadata_size(metadata: dict[str, str]) -> None:
    size = sum(len(key.encode()) + len(value.encode()) for key, value in metadata.items())
    if size > MAX_METADATA_BYTES:
        raise PromptFormatError(f"the prompt file's metadata is {size} bytes; the limit is {MAX_METADATA_BYTES} "
                                f"bytes (MAX_METADATA_BYTES)")


def parse_json(text: str | bytes, what: str) -> Any:
    """JSON from an upload: at most MAX_METADATA_BYTES, nested at most MAX_JSON_DEPTH levels; PromptFormatError
    naming `what` otherwise (never a RecursionError)."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_METADATA_BYTES:
        raise PromptFormatError(f"{what} is {size} bytes; the limit is {MAX_METADATA_BYTES} bytes (MAX_METADATA_BYTES)")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptFormatError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # the parser's own limit, far deeper than MAX_JSON_DEPTH
        raise _too_deep(what) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise _too_deep(what)
    return value


def _too_deep(what: str) -> PromptFormatError:
    return PromptFormatError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep (MAX_JSON_DEPTH)")


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0, [] or {}: 1); no recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _validate_embeddings(pf: PromptFile, max_virtual_tokens: int) -> None:
    emb = pf.prompt_embeddings
    if not isinstance(emb, torch.Tensor) or not emb.is_floating_point():
        raise PromptFormatError("prompt_embeddings must be a floating-point tensor")
    if emb.dim() != 2:
        raise PromptFormatError(f"prompt_embeddings must be 2-D [P, width], got shape {list(emb.shape)}")
    rows = emb.shape[0]
    if rows != pf.num_virtual_tokens:
        raise PromptFormatError(
            f"prompt_embeddings has {rows} rows but num_virtual_tokens is {pf.num_virtual_tokens}"
        )
    if not 1 <= rows <= max_virtual_tokens:
        raise PromptFormatError(f"num_virtual_tokens must be between 1 and {max_virtual_tokens}, got {rows}")
    if not all_finite(emb):
        raise PromptFormatError("prompt_embeddings contains NaN or infinite values")


def _validate_width(pf: PromptFile, base: BaseIdentity) -> None:
    width = pf.prompt_embeddings.shape[1]
    if pf.kind == "prompt" and width != base.hidden_size:
        raise PromptFormatError(
            f"shallow prompt_embeddings must be {base.hidden_size} wide (hidden_size), got {width}"
        )
    if pf.kind == "prefix" and width != embedding_width(Kind.PREFIX, base):
        raise PromptFormatError(
            f"prefix prompt_embeddings must be {embedding_width(Kind.PREFIX, base)} wide "
            f"(num_layers*2*num_kv_heads*head_dim = {base.num_layers}*2*{base.num_kv_heads}*{base.head_dim}), "
            f"got {width}"
        )


def _validate_labels_and_head(pf: PromptFile) -> None:
    has_head = pf.head_weight is not None or pf.head_bias is not None
    if pf.task == "generate":
        if pf.labels:
            raise PromptFormatError("a generate prompt must have no labels")
        if has_head:
            raise PromptFormatError("a generate prompt must have no head")
        return
    if not pf.labels:
        raise PromptFormatError(f"a {pf.task} prompt needs a non-empty list of labels")
    if any(not isinstance(label, str) or not label for label in pf.labels):
        raise PromptFormatError("labels must be non-empty strings")
    if len(set(pf.labels)) != len(pf.labels):
        raise PromptFormatError(f"labels must be unique, got {pf.labels}")
    if pf.task == "tag" and pf.head_weight is None:
        raise PromptFormatError("a tag prompt needs a head (head.weight [num_labels, hidden])")
    if has_head:
        _validate_head(pf)


def _validate_head(pf: PromptFile) -> None:
    n, hidden = len(pf.labels), pf.base.hidden_size
    weight, bias = pf.head_weight, pf.head_bias
    if weight is None:
        raise PromptFormatError("head.bias given without head.weight")
    if list(weight.shape) != [n, hidden]:
        raise PromptFormatError(
            f"head.weight must be [num_labels, hidden] = [{n}, {hidden}], got {list(weight.shape)}"
        )
    if bias is not None and list(bias.shape) != [n]:
        raise PromptFormatError(f"head.bias must be [num_labels] = [{n}], got {list(bias.shape)}")
    for tensor_name, tensor in ((HEAD_WEIGHT_KEY, weight), (HEAD_BIAS_KEY, bias)):
        if tensor is not None and not all_finite(tensor):
            raise PromptFormatError(f"{tensor_name} contains NaN or infinite values")


# --- bytes <-> PromptFile -------------------------------------------------------------------------


def read_safetensors_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors blob; refuses anything else, pickles with a specific message."""
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types, plus OverflowError/ValueError
        # Checked only after safetensors failed: a valid header length may itself start with 0x80.
        if bytes(data[:4]).startswith(PICKLE_MAGICS):
            raise PromptFormatError("pickle files are refused; only safetensors are read") from exc
        raise PromptFormatError(f"not a valid safetensors file: {exc}") from exc
    # safetensors validated the header above; it is an 8-byte little-endian length then JSON.
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + header_len]))
    return tensors, header.get("__metadata__") or {}


def dump_prompt(pf: PromptFile) -> bytes:
    tensors = {EMBEDDINGS_KEY: _as_stored(pf.prompt_embeddings)}
    if pf.head_weight is not None:
        tensors[HEAD_WEIGHT_KEY] = _as_stored(pf.head_weight)
    if pf.head_bias is not None:
        tensors[HEAD_BIAS_KEY] = _as_stored(pf.head_bias)
    return safetensors.torch.save(tensors, metadata=_metadata(pf))


def _metadata(pf: PromptFile) -> dict[str, str]:
    """The safetensors metadata a prompt file is written with."""
    metadata = {
        "format": "pt",  # what HF tools expect in a torch safetensors file
        "format_version": str(FORMAT_VERSION),
        "name": pf.name,
        "kind": pf.kind,
        "task": pf.task,
        "num_virtual_tokens": str(pf.num_virtual_tokens),
        "labels": json.dumps(list(pf.labels)),
        "description": pf.description,
        "base": json.dumps(pf.base.to_dict(), sort_keys=True),
        "source": pf.source,
        "version": str(pf.version),
        "created_at": pf.created_at,
    }
    return {key if key == "format" else META_PREFIX + key: value for key, value in metadata.items()}


def _as_stored(tensor: torch.Tensor) -> torch.Tensor:
    # clone: safetensors refuses tensors that share storage (e.g. views of a training parameter)
    return tensor.detach().to("cpu", torch.float32).contiguous().clone()


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_prompt_bytes(data: bytes) -> PromptFile:
    """Parse a prompt file. Checks the format only; call validate_prompt for the base-dependent rules."""
    tensors, metadata = read_safetensors_bytes(data)
    check_metadata_size(metadata)  # before any of it is parsed
    version = metadata.get(META_PREFIX + "format_version")
    if version is None:
        raise PromptFormatError("not a softserve prompt file: metadata key softserve.format_version is missing")
    if version != str(FORMAT_VERSION):
        raise PromptFormatError(f"unsupported prompt format version {version!r} (this server reads {FORMAT_VERSION})")
    if EMBEDDINGS_KEY not in tensors:
        raise PromptFormatError(f"missing tensor {EMBEDDINGS_KEY!r}")
    extra = sorted(set(tensors) - {EMBEDDINGS_KEY, HEAD_WEIGHT_KEY, HEAD_BIAS_KEY})
    if extra:
        raise PromptFormatError(f"unexpected tensors in prompt file: {', '.join(extra)}")

    kind, task = _meta(metadata, "kind"), _meta(metadata, "task")
    if kind not in KINDS:
        raise PromptFormatError(f"unknown prompt kind {kind!r}; expected one of {', '.join(KINDS)}")
    if task not in TASKS:
        raise PromptFormatError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    labels = _meta_json(metadata, "labels")
    if not isinstance(labels, list):
        raise PromptFormatError("metadata softserve.labels must be a JSON list")
    return PromptFile(
        name=_meta(metadata, "name"),
        kind=Kind(kind),
        task=Task(task),
        num_virtual_tokens=_meta_int(metadata, "num_virtual_tokens"),
        labels=labels,
        description=metadata.get(META_PREFIX + "description", ""),
        base=BaseIdentity.from_dict(_meta_json(metadata, "base")),
        prompt_embeddings=_as_float(EMBEDDINGS_KEY, tensors[EMBEDDINGS_KEY]),
        head_weight=_as_float(HEAD_WEIGHT_KEY, tensors.get(HEAD_WEIGHT_KEY)),
        head_bias=_as_float(HEAD_BIAS_KEY, tensors.get(HEAD_BIAS_KEY)),
        source=metadata.get(META_PREFIX + "source", ""),
        version=_meta_int(metadata, "version"),
        created_at=metadata.get(META_PREFIX + "created_at", ""),
        digest=file_digest(data),
    )


def load_prompt_file(path: str | Path) -> PromptFile:
    return load_prompt_bytes(Path(path).read_bytes())


def _as_float(key: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """float32, from any floating dtype; integer or bool tensors are refused, not silently converted."""
    if tensor is None:
        return None
    if not tensor.is_floating_point():
        raise PromptFormatError(f"tensor {key!r} must be floating-point, got {tensor.dtype}")
    return tensor.float()


def _meta(metadata: dict[str, str], key: str) -> str:
    try:
        return metadata[META_PREFIX + key]
    except KeyError:
        raise PromptFormatError(f"missing metadata key {META_PREFIX}{key}") from None


def _meta_int(metadata: dict[str, str], key: str) -> int:
    value = _meta(metadata, key)
    try:
        return int(value)
    except ValueError:
        raise PromptFormatError(f"metadata {META_PREFIX}{key} must be an integer, got {value!r}") from None


def _meta_json(metadata: dict[str, str], key: str) -> Any:
    return parse_json(_meta(metadata, key), f"metadata {META_PREFIX}{key}")
