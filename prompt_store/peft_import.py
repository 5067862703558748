"""Import a PEFT prompt-learning adapter (adapter_config.json + adapter_model.safetensors) as a PromptFile.

What PEFT 0.21 writes (peft/utils/save_and_load.py, peft/peft_model.py get_prompt_embedding_to_save):
- `prompt_embeddings` is the prompt encoder's *output*, so P-tuning's MLP/LSTM and prefix tuning's
  prefix_projection MLP have already been applied; the config is saved with inference_mode=true, under
  which PEFT itself uses the tensor as-is. Shallow: [P, hidden]. Prefix: [P, num_layers*2*token_dim],
  token_dim = head_dim*num_key_value_heads under GQA.
- SEQ_CLS / TOKEN_CLS heads come through modules_to_save as `base_model.score.weight` (+ `.bias` for
  token classification); other PEFT versions or models may write `base_model.model.score...`,
  `...score.modules_to_save.default.weight` or `classifier.*`, all accepted here.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prompt_store.format import (
    EMBEDDINGS_KEY,
    MAX_VIRTUAL_TOKENS,
    BaseIdentity,
    Kind,
    PromptFile,
    PromptFormatError,
    Task,
    parse_json,
    read_safetensors_bytes,
    validate_prompt,
)

PEFT_TYPE_TO_KIND = {"PROMPT_TUNING": Kind.PROMPT, "P_TUNING": Kind.PROMPT, "PREFIX_TUNING": Kind.PREFIX}
TASK_TYPE_TO_TASK = {"CAUSAL_LM": Task.GENERATE, "SEQ_CLS": Task.CLASSIFY, "TOKEN_CLS": Task.TAG}

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"

# A classification head saved through modules_to_save, under any of the prefixes PEFT versions use.
HEAD_KEY = re.compile(
    r"(?:base_model\.)?(?:model\.)?(?P<module>score|classifier)"
    r"(?:\.modules_to_save\.[^.]+)?\.(?P<param>weight|bias)"
)


def import_peft_dir(
    adapter_dir: str | Path,
    name: str,
    base: BaseIdentity,
    labels: list[str] | None = None,
    description: str = "",
    max_virtual_tokens: int = MAX_VIRTUAL_TOKENS,
) -> PromptFile:
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    if not config_path.is_file():
        raise PromptFormatError(f"{adapter_dir} has no {CONFIG_FILE}; is it a PEFT adapter directory?")
    if not weights_path.is_file():
        if (adapter_dir / PICKLED_WEIGHTS_FILE).exists():
            raise PromptFormatError(
                f"{PICKLED_WEIGHTS_FILE} is a pickle file and pickle files are refused; "
                f"save the adapter with safe_serialization=True to get {WEIGHTS_FILE}"
            )
        raise PromptFormatError(f"{adapter_dir} has no {WEIGHTS_FILE}")
    config = parse_adapter_config(config_path.read_bytes())
    return import_peft_files(config, weights_path.read_bytes(), name, base, labels, description, max_virtual_tokens)


def parse_adapter_config(data: bytes) -> Any:
    """adapter_config.json's content, within the metadata limits (size, nesting)."""
    return parse_json(data, CONFIG_FILE)


def import_peft_files(
    config: dict[str, Any],
    weights: bytes,
    name: str,
    base: BaseIdentity,
    labels: list[str] | None = None,
    description: str = "",
    max_virtual_tokens: int = MAX_VIRTUAL_TOKENS,
) -> PromptFile:
    """The upload path: adapter_config.json already parsed, adapter_model.safetensors as bytes. Validated
    against `base` (shapes, labels, limits); nothing is computed with the model here."""
    if not isinstance(config, dict):
        raise PromptFormatError(f"{CONFIG_FILE} must be a JSON object, got {type(config).__name__}")
    kind, task = _kind_and_task(config)
    tensors, _ = read_safetensors_bytes(weights)
    embeddings = _prompt_embeddings(tensors, config)
    if kind == Kind.PREFIX:
        _check_prefix_layout(config, base)
    head_weight, head_bias = _find_head(tensors)
    labels = _labels(head_weight, head_bias, labels, task)

    pf = PromptFile(
        name=name,
        kind=kind,
        task=task,
        num_virtual_tokens=embeddings.shape[0],
        labels=list(labels or []),
        description=description,
        base=base,
        prompt_embeddings=embeddings.float().contiguous(),
        head_weight=None if head_weight is None else head_weight.float().contiguous(),
        head_bias=None if head_bias is None else head_bias.float().contiguous(),
        source=f"peft:{config['peft_type']}",
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    validate_prompt(pf, base, max_virtual_tokens)
    return pf


def _prompt_embeddings(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
    """The learned prompt, [num_virtual_tokens, width]; every tensor must be floating-point. Takes it out of
    `tensors`, leaving the head's, if any."""
    embeddings = tensors.pop(EMBEDDINGS_KEY, None)
    if embeddings is None:
        raise PromptFormatError(f"adapter weights have no {EMBEDDINGS_KEY!r} tensor")
    for key, tensor in [(EMBEDDINGS_KEY, embeddings), *tensors.items()]:
        if not tensor.is_floating_point():
            raise PromptFormatError(f"adapter tensor {key!r} must be floating-point, got {tensor.dtype}")
    num_virtual_tokens = config.get("num_virtual_tokens")
    if embeddings.dim() != 2 or embeddings.shape[0] != num_virtual_tokens:
        raise PromptFormatError(
            f"adapter prompt_embeddings has shape {list(embeddings.shape)} "
            f"but adapter_config.json says num_virtual_tokens={num_virtual_tokens}"
        )
    return embeddings


def _labels(head_weight: torch.Tensor | None, head_bias: torch.Tensor | None, labels: list[str] | None,
            task: Task) -> list[str] | None:
    """The labels for the head (given, or LABEL_i per row); a classify adapter without a head needs them."""
    if head_weight is not None:
        if head_weight.dim() != 2 or (head_bias is not None and head_bias.dim() != 1):
            bias_shape = None if head_bias is None else list(head_bias.shape)
            raise PromptFormatError(f"adapter head must be a 2-D weight [num_labels, hidden] and a 1-D bias, got "
                                    f"weight {list(head_weight.shape)}, bias {bias_shape}")
        rows = head_weight.shape[0]
        if labels is None:
            return [f"LABEL_{i}" for i in range(rows)]
        if len(labels) != rows:
            raise PromptFormatError(f"{len(labels)} labels given but the adapter's head has {rows} rows")
    elif task == Task.CLASSIFY and not labels:
        raise PromptFormatError(
            "this classify adapter has no head: give its labels (they are scored as label words)"
        )
    return labels


def _kind_and_task(config: dict[str, Any]) -> tuple[Kind, Task]:
    peft_type, task_type = config.get("peft_type"), config.get("task_type")
    # isinstance first: a list or dict is unhashable, and `in` on a dict would raise instead of refusing
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_KIND:
        raise PromptFormatError(
            f"PEFT type {peft_type!r} is not supported; supported: {', '.join(PEFT_TYPE_TO_KIND)}"
        )
    if not isinstance(task_type, str) or task_type not in TASK_TYPE_TO_TASK:
        raise PromptFormatError(
            f"PEFT task type {task_type!r} is not supported; supported: {', '.join(TASK_TYPE_TO_TASK)}"
        )
    # Encoder-decoder models get two prompt copies (encoder + decoder); softserve serves decoder-only bases.
    if config.get("num_transformer_submodules", 1) != 1:
        raise PromptFormatError("adapters for encoder-decoder models are not supported")
    return PEFT_TYPE_TO_KIND[peft_type], TASK_TYPE_TO_TASK[task_type]


def _check_prefix_layout(config: dict[str, Any], base: BaseIdentity) -> None:
    """The row width alone cannot tell 2 heads x 16 from 4 heads x 8; the config records PEFT's split."""
    expected = {
        "num_layers": base.num_layers,
        "num_attention_heads": base.num_kv_heads,  # PEFT stores the KV head count here under GQA
        "token_dim": base.num_kv_heads * base.head_dim,
    }
    for key, want in expected.items():
        got = config.get(key)
        if got is not None and got != want:
            raise PromptFormatError(
                f"prefix adapter was made for {key}={got}, this server's base needs {key}={want} "
                f"(num_layers={base.num_layers}, num_kv_heads={base.num_kv_heads}, head_dim={base.head_dim})"
            )


def _find_head(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Head weight and bias from the non-prompt tensors; any tensor that is not a head is refused."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = HEAD_KEY.fullmatch(key)
        if match is None:
            raise PromptFormatError(f"unexpected tensor {key!r} in a prompt-learning adapter")
        found.setdefault(match["module"], {})[match["param"]] = tensor
    if len(found) > 1:
        raise PromptFormatError(f"adapter has more than one head: {', '.join(sorted(found))}")
    head = next(iter(found.values()), {})
    if "bias" in head and "weight" not in head:
        raise PromptFormatError("adapter head has a bias but no weight")
    return head.get("weight"), head.get("bias")
