"""Per-row changes to the logits before sampling: penalties, logit bias, the grammar mask of structured output
and the tokens a row may not pick yet (end of sequence before `min_tokens`, unless the grammar allows nothing
else).

Only rows that ask for one of these are touched, one at a time; a batch where no row does returns its logits
unchanged, so the sampler's all-greedy fast path stays one argmax.
"""
from __future__ import annotations

import torch

from app.engine.sampling import sanitize
from app.engine.sequence import Sequence


def needs_adjusting(seq: Sequence, eos_ids: frozenset[int]) -> bool:
    p = seq.sampling
    return (p.penalizes or seq.grammar is not None
            or (len(seq.output_ids) < p.min_tokens and bool(p.stop_token_ids or (eos_ids and not p.ignore_eos))))


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int]) -> torch.Tensor:
    """logits (R, V), row i of seqs[i] -> the logits each row samples from."""
    rows = [i for i, seq in enumerate(seqs) if needs_adjusting(seq, eos_ids)]
    if not rows:
        return logits
    logits = sanitize(logits)  # a float32 copy: rows are changed in place below
    for i in rows:
        adjust_row(logits[i], seqs[i], eos_ids)
    return logits


def adjust_row(row: torch.Tensor, seq: Sequence, eos_ids: frozenset[int]) -> None:
    p = seq.sampling
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), dtype=torch.long, device=row.device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        ids = torch.tensor(seq.output_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(ids, minlength=row.shape[0])[:row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    for token, bias in p.logit_bias.items():
        if token < row.shape[0]:
            row[token] += bias
    if seq.grammar is not None:
        seq.grammar.mask(row)
    if len(seq.output_ids) < p.min_tokens:
        hold_back_the_end(row, seq, eos_ids)


def hold_back_the_end(row: torch.Tensor, seq: Sequence, eos_ids: frozenset[int]) -> None:
    """min_tokens: end-of-sequence and stop tokens may not be picked yet, unless a grammar allows nothing
    else (it is complete and only its end may follow): the grammar wins, and the output ends there."""
    p = seq.sampling
    banned = [t for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids)) if t < row.shape[0]]
    kept = row[banned].clone()
    row[banned] = float("-inf")
    if seq.grammar is not None and not torch.isfinite(row).any():
        row[banned] = kept
