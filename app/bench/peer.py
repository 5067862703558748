"""The peer: what a user would run without softserve. Follows the project's peer_baseline.py
(../shared/bench/peer_baseline.py: the shared folder beside the repository, not in it).

HF transformers generate() on the same frozen base. PEFT cannot mix prompt-learning adapters in one
batch, so requests are grouped per task and each group is generated batch by batch (--batch rows).
Each prompt is applied exactly as PEFT defines it: a shallow prompt (prompt tuning) is prepended to the
input embeddings (inputs_embeds); a deep prefix (P-Tuning v2) is handed over as a DynamicCache filled by
PEFT's get_prompt reshape, the text starting at position P. Left padding, greedy, and
min_new_tokens = max_new_tokens = new, so every request gets exactly `new` tokens.
PeftModel.generate() itself is not used: with transformers 5.x it is wrong for prompt learning (see
tests/test_peft_equivalence.py, which checks our outputs against PeftModel's forward instead).

Timing per request: all requests arrive at t0; a request's first token is when its batch's first decoding
step ends (a stopping criterion records it), its latency is when its batch's generate() returns.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from app.bench.workload import TASK_KINDS, TASKS, Request


@dataclass
class RequestResult:
    tokens: list[int]
    ttft_s: float
    latency_s: float
    token_times: list[float] | None = None  # when each token arrived (softserve side only)


class _FirstStep(StoppingCriteria):
    """Never stops; remembers when the first new token of the batch was chosen."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def prefix_cache(cfg, emb: torch.Tensor, batch: int) -> DynamicCache:
    """PEFT's get_prompt: view(B, P, layers*2, kv_heads, head_dim).permute(2, 0, 3, 1, 4).split(2)."""
    P = emb.shape[0]
    kv = emb.unsqueeze(0).expand(batch, -1, -1).reshape(batch, P, cfg.num_hidden_layers * 2,
                                                          cfg.num_key_value_heads, cfg.head_dim)
    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv.permute(2, 0, 3, 1, 4).split(2)):
        cache.update(k.contiguous(), v.contiguous(), layer)
    return cache


@torch.inference_mode()
def generate_batch(model, kind: str, prompt: torch.Tensor, reqs: list[list[int]], new: int,
                   first: _FirstStep | None = None) -> torch.Tensor:
    """One generate() over a left-padded batch of one task -> the new tokens (B, new)."""
    dev = prompt.device
    cfg = model.config
    width = max(len(r) for r in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros(len(reqs), width, dtype=torch.long)
    for i, r in enumerate(reqs):  # left padding
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    ones = torch.ones(len(reqs), prompt.shape[0], dtype=torch.long, device=dev)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              stopping_criteria=StoppingCriteriaList([first] if first else []))
    if kind == "prompt":
        emb = torch.cat([prompt.unsqueeze(0).expand(len(reqs), -1, -1), model.model.embed_tokens(ids)], 1)
        out = model.generate(inputs_embeds=emb, attention_mask=torch.cat([ones, mask], 1), **kw)
    else:
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        out = model.generate(input_ids=ids, attention_mask=torch.cat([ones, mask], 1),
                             past_key_values=prefix_cache(cfg, prompt, len(reqs)), **kw)
    return out[:, -new:]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_peer(model, prompts: dict[str, torch.Tensor], reqs: list[Request], new: int, batch: int,
             progress=None) -> tuple[list[RequestResult], float, dict]:
    """Grouped per task, batch by batch. prompts: task -> PEFT-layout tensor on the model's device/dtype.
    Returns per-request results (in request order), the wall time, and the time split: first step of
    each batch (prefill + first token) vs the rest (decode)."""
    device = next(model.parameters()).device
    results: dict[int, RequestResult] = {}
    split = dict(batches=0, prefill_s=0.0, decode_s=0.0)
    sync(device)
    t0 = time.perf_counter()
    for task in TASKS:
        mine = [r for r in reqs if r.task == task]
        for i in range(0, len(mine), batch):
            group = mine[i:i + batch]
            first = _FirstStep()
            start = time.perf_counter()
            out = generate_batch(model, TASK_KINDS[task], prompts[task], [r.token_ids for r in group], new, first)
            rows = out.tolist()  # a host sync: the batch is done
            end = time.perf_counter()
            split["batches"] += 1
            split["prefill_s"] += (first.at or end) - start
            split["decode_s"] += end - (first.at or end)
            for r, row in zip(group, rows):
                results[r.index] = RequestResult(row, (first.at or end) - t0, end - t0)
            if progress is not None:
                progress(len(group))
    sync(device)
    wall = time.perf_counter() - t0
    return [results[r.index] for r in reqs], wall, split
