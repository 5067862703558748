"""Per-row logit changes (app/engine/logits.py) against their formulas, and that rows without any are left
alone."""
from __future__ import annotations

import torch

from app.engine.logits import adjust_logits
from app.engine.sampling import SamplingParams
from app.engine.sequence import Sequence
from prompt_store.format import Task

EOS = frozenset({0})


def seq(prompt_ids, output_ids, **params) -> Sequence:
    s = Sequence(None, list(prompt_ids), Task.GENERATE, SamplingParams(**params))
    s.output_ids = list(output_ids)
    return s


def test_penalties_and_bias_follow_their_formulas():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0]])
    s = seq([1], [2, 3, 3], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
            logit_bias={4: -10.0})
    got = adjust_logits(logits, [s], EOS)[0]
    want = torch.tensor([1.0, 2.0 / 2, -1.0 * 2 - 0.25 - 0.5, 0.5 / 2 - 0.5 - 0.5, 3.0 - 10.0])
    assert torch.allclose(got, want)
    assert logits[0, 1] == 2.0  # the caller's logits are not changed


def test_min_tokens_holds_back_eos_and_stop_tokens_then_releases_them():
    logits = torch.zeros(2, 5)
    early, late = seq([1], [2], min_tokens=3, stop_token_ids=[4]), seq([1], [2, 2, 2], min_tokens=3, stop_token_ids=[4])
    got = adjust_logits(logits, [early, late], EOS)
    assert got[0].tolist() == [float("-inf"), 0, 0, 0, float("-inf")]
    assert got[1].tolist() == [0.0] * 5


def test_rows_asking_nothing_are_untouched():
    logits = torch.randn(2, 5)
    assert adjust_logits(logits, [seq([1], [2]), seq([3], [])], EOS) is logits
