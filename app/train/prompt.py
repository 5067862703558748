"""The trainable part: a shallow or deep prompt (and a head), run through the frozen model as serving runs it.

Shallow ("prompt", Lester et al.): P learned embeddings [P, hidden] prepended to the text's embeddings;
the virtual tokens sit at positions 0..P-1 and the text at P, P+1, ... Serving computes the virtual
tokens' K,V once at those same positions, and causal attention makes the two identical.
Deep ("prefix", P-Tuning v2): learned [P, layers*2*kv_heads*head_dim] in PEFT's layout, turned into
per-layer K,V by the serving code's own `deep_prefix_kv` and given to DenseAttention as the prefix; the
text again starts at position P.

Batches are right-padded, so every real token's position is P + its index, exactly as in serving; the
key mask hides the padding.
"""
from __future__ import annotations

import torch
from torch import nn

from app.engine.model import DenseAttention, ModelArgs, Transformer
from app.engine.task_prompt import deep_prefix_kv
from prompt_store.format import KINDS, Kind, Task, embedding_width

INIT_VOCAB = 5000  # Lester et al. draw init tokens from the most frequent 5,000; BPE ids are roughly by merge rank


class TrainablePrompt(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, task: str, embeddings: torch.Tensor, num_labels: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown prompt kind {kind!r}; expected one of {', '.join(KINDS)}")
        width = embedding_width(kind, args)
        if embeddings.dim() != 2 or embeddings.shape[1] != width:
            raise ValueError(f"{kind} embeddings must be [P, {width}], got {list(embeddings.shape)}")
        self.args, self.kind, self.task = args, kind, task
        self.embeddings = nn.Parameter(embeddings.detach().float().clone())  # PEFT's prompt_embeddings
        self.head = nn.Linear(args.hidden_size, num_labels) if task in (Task.TAG, Task.CLASSIFY) else None

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def text_hidden(self, model: Transformer, ids: torch.Tensor, mask: torch.Tensor,
                    shared_prefix: bool = False) -> torch.Tensor:
        """ids, mask (B, T), right-padded -> final-normed hidden states of the text (B, T, hidden).

        shared_prefix (evaluation): a shallow prompt's K,V are computed once for the batch, as serving does,
        instead of running the virtual tokens in every row; the same numbers, fewer FLOPs.
        """
        B, T = ids.shape
        P = self.num_virtual_tokens
        dtype = model.embed_tokens.weight.dtype
        if self.kind == Kind.PROMPT and shared_prefix:
            record = DenseAttention(record=True)
            model(torch.arange(P, device=ids.device)[None], record, embeds=self.embeddings.to(dtype)[None])
            positions = (P + torch.arange(T, device=ids.device))[None].expand(B, -1)
            return model(positions, DenseAttention(prefix=record.recorded, key_mask=mask), tokens=ids)
        if self.kind == Kind.PROMPT:
            virtual = self.embeddings.to(dtype)[None].expand(B, -1, -1)
            embeds = torch.cat([virtual, model.embed_tokens(ids)], 1)
            positions = torch.arange(P + T, device=ids.device)[None].expand(B, -1)
            keys = torch.cat([torch.ones(B, P, dtype=torch.bool, device=ids.device), mask], 1)
            return model(positions, DenseAttention(key_mask=keys), embeds=embeds)[:, P:]
        k, v = deep_prefix_kv(self.args, self.embeddings.to(dtype))  # (layers, kv_heads, P, head_dim)
        prefix = [(k[i][None], v[i][None]) for i in range(self.args.num_layers)]
        positions = (P + torch.arange(T, device=ids.device))[None].expand(B, -1)
        return model(positions, DenseAttention(prefix=prefix, key_mask=mask), tokens=ids)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.float())


def random_token_ids(vocab_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    low, high = min(10, vocab_size - 1), min(INIT_VOCAB, vocab_size)  # skip the first ids: special tokens
    return torch.randint(low, high, (count,), generator=generator)


@torch.no_grad()
def initial_embeddings(model: Transformer, kind: str, num_virtual_tokens: int,
                       generator: torch.Generator) -> torch.Tensor:
    """Both kinds start from a prompt of random real tokens (Lester et al.'s vocabulary init).

    Shallow: those tokens' embeddings. Deep: the K,V the frozen model itself computes for them at positions
    0..P-1, written in PEFT's layout - the prefix a shallow prompt of those tokens would serve with. Deep
    prefixes thus start in the range of values every layer's attention expects (a small random prefix has
    keys of the wrong scale per layer), and training moves them from there.
    """
    ids = random_token_ids(model.args.vocab_size, num_virtual_tokens, generator).to(model.embed_tokens.weight.device)
    embeds = model.embed_tokens(ids)
    if kind == Kind.PROMPT:
        return embeds.float().cpu()
    attention = DenseAttention(record=True)
    model(torch.arange(num_virtual_tokens, device=ids.device)[None], attention, embeds=embeds[None])
    kv = torch.stack([t[0] for pair in attention.recorded for t in pair])  # (layers*2, kv_heads, P, head_dim)
    return kv.permute(2, 0, 1, 3).reshape(num_virtual_tokens, -1).float().cpu()  # inverse of deep_prefix_kv
