"""A registered task prompt, ready to serve: its per-layer K,V prefix (computed once) and its head.

Shallow prompts (prompt tuning, P-tuning) run their P virtual embeddings through the frozen model once,
at positions 0..P-1, and keep the K,V every layer produced. Under causal attention the virtual tokens
never see the text, so this is exactly what PEFT computes when it prepends the embeddings to every input.
Deep prompts (prefix tuning / P-Tuning v2) already are per-layer K,V: PEFT's `get_prompt` reshape.
"""
from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass, field

import torch

from app.engine.model import DenseAttention, ModelArgs, Transformer
from app.engine.request import Task
from app.engine.sampling import sanitize
from prompt_store.format import Kind, PromptFile

Key = tuple[str, int, str]  # (name, version, digest): one stored version of a prompt (digest "": never stored)


@dataclass(eq=False)  # identity: two versions of one name are different prompts, whatever their fields
class TaskPrompt:
    name: str
    version: int
    kind: Kind
    task: Task
    labels: list[str]
    k: torch.Tensor  # (layers, kv_heads, P, head_dim), in CPU memory: KV blocks are filled from it on use
    v: torch.Tensor
    head_weight: torch.Tensor | None = None  # (labels, hidden), on the model's device
    head_bias: torch.Tensor | None = None
    label_token_ids: list[int] | None = None  # classify without a head: first token of each label word
    digest: str = ""  # of its stored file ("" for a prompt that was never stored)
    # The prefix cache's root for its requests: from its name, version and digest (a reload of the same file
    # finds its cached blocks again; no other prompt or version ever shares one), unique when unstored.
    cache_key: bytes = field(default_factory=lambda: uuid.uuid4().bytes)

    @property
    def key(self) -> Key:
        return self.name, self.version, self.digest

    @property
    def num_virtual_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        heads = [t for t in (self.head_weight, self.head_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, *heads))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., hidden_size) -> label probabilities (..., labels)."""
        logits = torch.nn.functional.linear(hidden.to(self.head_weight.dtype), self.head_weight, self.head_bias)
        return sanitize(logits).softmax(-1)


@torch.inference_mode()
def prefix_kv(model: Transformer, kind: str, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT-layout prompt_embeddings -> k, v each (layers, kv_heads, P, head_dim) on the model's device."""
    args = model.args
    weight = model.embed_tokens.weight
    emb = embeddings.to(weight.device, weight.dtype)
    P = emb.shape[0]
    if kind == Kind.PROMPT:
        attention = DenseAttention(record=True)
        model(torch.arange(P, device=emb.device)[None], attention, embeds=emb[None])
        k = torch.stack([k[0] for k, _ in attention.recorded])
        v = torch.stack([v[0] for _, v in attention.recorded])
        return k.contiguous(), v.contiguous()
    k, v = deep_prefix_kv(args, emb)
    return k.contiguous(), v.contiguous()


def deep_prefix_kv(args: ModelArgs, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's prefix layout [P, layers*2*kv_heads*head_dim] -> k, v views (layers, kv_heads, P, head_dim).

    PEFT: view(B, P, layers*2, kv_heads, head_dim).permute(2, 0, 3, 1, 4).split(2): layer i is (2i, 2i+1).
    Differentiable, so training uses the very same reshape as serving.
    """
    P = embeddings.shape[0]
    kv = embeddings.view(P, args.num_layers * 2, args.num_kv_heads, args.head_dim).permute(1, 2, 0, 3)
    return kv[0::2], kv[1::2]


def label_first_tokens(labels: list[str], encode) -> list[int]:
    """First token of each label word; labels must differ in it to be scored by the LM head."""
    ids = [encode(label)[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise ValueError("labels share a first token, so the LM head cannot score them apart; "
                         "upload the prompt with a classification head")
    return ids


MAX_ABS_VALUE = 1e4  # trained prompts and heads stay orders of magnitude below; beyond it float32 math overflows
PROBE_TEXT = "The quick brown fox jumps over the lazy dog, 3 times; then it rests."


@torch.inference_mode()
def check_servable(model: Transformer, pf: PromptFile, encode) -> TaskPrompt:
    """Raise ValueError unless the prompt gives finite outputs: bounded values, and a forward of its prefix,
    the model and its head over a probe input that is finite everywhere (a 422 at upload, so that no request
    ever meets a NaN from it). The prompt must have passed validate_prompt (shapes, row count, labels): the
    forward's cost grows with the square of its rows. Returns the prompt it built."""
    for name, tensor in (("prompt_embeddings", pf.prompt_embeddings), ("head.weight", pf.head_weight),
                         ("head.bias", pf.head_bias)):
        if tensor is not None and not tensor.abs().max() <= MAX_ABS_VALUE:
            raise ValueError(f"{name} has values beyond +-{MAX_ABS_VALUE:g}; no trained prompt needs them and "
                             f"they overflow the model's arithmetic")
    prompt = build_task_prompt(model, pf, encode)
    ids = torch.tensor([encode(PROBE_TEXT)], device=prompt.k.device)
    P, T = prompt.num_virtual_tokens, ids.shape[1]
    k, v = prompt.k.to(ids.device), prompt.v.to(ids.device)
    prefix = [(k[layer][None], v[layer][None]) for layer in range(model.args.num_layers)]
    hidden = model(torch.arange(P, P + T, device=ids.device)[None], DenseAttention(prefix=prefix), tokens=ids)[0]
    outputs = {"the prompt's K,V prefix": torch.stack([k, v]), "the model's hidden states": hidden,
               "the next-token logits": model.logits(hidden[-1])}
    if prompt.head_weight is not None:
        outputs["the head's logits"] = torch.nn.functional.linear(hidden, prompt.head_weight, prompt.head_bias)
    for what, tensor in outputs.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"this prompt makes {what} non-finite (NaN or infinite) on a probe input")
    return prompt


def build_task_prompt(model: Transformer, pf: PromptFile, encode) -> TaskPrompt:
    k, v = (t.cpu() for t in prefix_kv(model, pf.kind, pf.prompt_embeddings))
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    head_w = None if pf.head_weight is None else pf.head_weight.to(device, dtype)
    head_b = None if pf.head_bias is None else pf.head_bias.to(device, dtype)
    label_ids = label_first_tokens(pf.labels, encode) if pf.task == Task.CLASSIFY and head_w is None else None
    prompt = TaskPrompt(pf.name, pf.version, pf.kind, pf.task, list(pf.labels), k, v, head_w, head_b, label_ids)
    return as_stored(prompt, pf.version, pf.digest) if pf.digest else prompt


def as_stored(prompt: TaskPrompt, version: int, digest: str) -> TaskPrompt:
    """The same prompt (its tensors shared) as the store's version `version` with file digest `digest`; its
    prefix cache key follows from them, so a reload of that file finds its cached blocks again."""
    key = hashlib.blake2b(f"{prompt.name}\0{version}\0{digest}".encode(), digest_size=16).digest()
    return dataclasses.replace(prompt, version=version, digest=digest, cache_key=key)
