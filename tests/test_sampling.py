"""filter_logits (top-k, top-p) and the temperature of sampling_probs, on hand-made distributions."""
import math

import pytest
import torch

from app.engine.sampling import SamplingParams, argmax, filter_logits, sampling_probs

NEG = float("-inf")
PROBS = [0.05, 0.5, 0.15, 0.3]  # token 1 first, then 3, 2, 0
LOGITS = torch.tensor([math.log(p) for p in PROBS])


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, x in enumerate(logits.tolist()) if x != NEG]


def test_no_cut_keeps_the_logits_as_they_are():
    assert torch.equal(filter_logits(LOGITS, top_k=0, top_p=1.0), LOGITS)


@pytest.mark.parametrize("top_k, want", [(1, [1]), (2, [1, 3]), (3, [1, 2, 3]), (4, [0, 1, 2, 3]), (9, [0, 1, 2, 3])])
def test_top_k_keeps_the_k_most_probable(top_k, want):
    out = filter_logits(LOGITS, top_k=top_k, top_p=1.0)
    assert kept(out) == want
    assert torch.equal(out[want], LOGITS[want])  # the kept logits are not changed


def test_top_k_keeps_ties_with_the_kth():
    assert kept(filter_logits(torch.tensor([1.0, 3.0, 3.0, 2.0]), top_k=1, top_p=1.0)) == [1, 2]


@pytest.mark.parametrize("top_p, want", [(0.4, [1]), (0.5, [1]), (0.75, [1, 3]), (0.9, [1, 2, 3]), (0.97, [0, 1, 2, 3])])
def test_top_p_keeps_the_nucleus_and_the_token_that_crosses_it(top_p, want):
    assert kept(filter_logits(LOGITS, top_k=0, top_p=top_p)) == want


def test_the_most_probable_token_survives_any_top_p():
    assert kept(filter_logits(LOGITS, top_k=0, top_p=1e-9)) == [1]


def test_top_k_then_top_p_over_what_is_left():
    # top_k=3 leaves 0.5, 0.3, 0.15 (renormalized: 0.526, 0.316, 0.158); top_p=0.8 keeps the first two
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.8)) == [1, 3]


@pytest.mark.parametrize("temperature, want", [(1.0, [1 / 3, 2 / 3]), (0.5, [0.2, 0.8]), (2.0, [0.4142, 0.5858])])
def test_temperature_divides_the_logits(temperature, want):
    probs = sampling_probs(torch.tensor([0.0, math.log(2)]), SamplingParams(temperature=temperature))
    assert probs.tolist() == pytest.approx(want, abs=1e-4)


def test_sampling_probs_are_zero_outside_the_cut():
    probs = sampling_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert probs.tolist() == pytest.approx([0, 0.5 / 0.8, 0, 0.3 / 0.8])


def test_a_tiny_temperature_or_top_k_1_is_greedy():
    assert SamplingParams(temperature=1e-6).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_the_greedy_choice_is_the_first_index_of_each_rows_maximum_as_torch_argmax_gives():
    """sampling.argmax finds it through max() (faster on CPU): the same index on ties, NaN rows and wide rows."""
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("nan"), 1.0, float("nan"), 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert argmax(x).tolist() == x.argmax(-1).tolist() == [1, 0, 0]
    wide = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0))
    wide[:, 100] = wide[:, 7] = 1e9  # a tie far apart in every row
    assert torch.equal(argmax(wide), wide.argmax(-1)) and (argmax(wide) == 7).all()
