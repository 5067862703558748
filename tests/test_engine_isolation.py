"""One request can never hurt another in the engine: hostile sampling values, a fault on one request's row,
a prompt replaced or re-created while requests run, big batch calls in the queue, prompts that would give NaN."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from app.engine import task_prompt
from app.engine.request import Overloaded
from app.engine.sampling import LOGPROB_FLOOR, SamplingParams, sample
from prompt_store.format import Task
from tests.test_engine import assert_same, greedy, ids, make_prompt, new_engine, run

HOSTILE = [  # (what a client sent, the SamplingParams it becomes)
    ("temperature 1e-300", dict(temperature=1e-300)),
    ("temperature 2e-5", dict(temperature=2e-5)),
    ("top_p 5e-324", dict(temperature=1.0, top_p=5e-324)),
    ("top_k beyond the vocabulary", dict(temperature=0.7, top_k=10 ** 9)),
    ("seed beyond 64 bits", dict(temperature=0.8, seed=2 ** 200 + 7)),
    ("negative seed", dict(temperature=0.8, seed=-(2 ** 63))),
]


@pytest.mark.parametrize("what, fields", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_sampling_hostile_values_give_a_valid_token_and_finite_logprobs(what, fields):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 30
    logits[1, 7] = float("nan")
    logits[2, :] = float("inf")
    params = [SamplingParams(logprobs=2, **fields)] * 3
    choices = sample(logits, params, [0, 1, 2], torch.Generator())
    for choice in choices:
        assert 0 <= choice.token_id < 50
        assert LOGPROB_FLOOR <= choice.logprob <= 0
        assert all(LOGPROB_FLOOR <= lp <= 0 for _, lp in choice.top)
    if fields.get("temperature", 1) < 1e-5 or fields.get("top_p", 1) < 1e-300:  # greedy, or only the best token kept
        assert choices[0].token_id == int(logits[0].argmax())


def test_a_seeded_draw_depends_only_on_the_seed_and_the_token_index():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=42)
    g = torch.Generator()
    first = [sample(logits[:1], [p], [i], g)[0].token_id for i in range(20)]
    again = [sample(logits[[1, 0]], [SamplingParams(temperature=0.5), p], [0, i], g)[1].token_id for i in range(20)]
    assert first == again and len(set(first)) > 5  # the same draws, and they do vary from token to token


def test_hostile_sampling_requests_run_beside_others_without_changing_them(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    prompts = [make_prompt(loaded, "shallow", "prompt", "generate", seed=1)]
    innocent = [("shallow", ids(6 + i, i), Task.GENERATE, greedy(8)) for i in range(3)]
    innocent.append(("shallow", ids(5, 9), Task.GENERATE, SamplingParams(max_tokens=8, temperature=0.9, seed=5,
                                                                        ignore_eos=True)))
    hostile = [("shallow", ids(4, 20 + i), Task.GENERATE, SamplingParams(max_tokens=8, ignore_eos=True, **fields))
               for i, (_, fields) in enumerate(HOSTILE)]
    engine = new_engine(loaded, tokenizer, prompts)
    try:
        alone = [run(engine, [r])[0] for r in innocent]
        crowd = run(engine, innocent[:2] + hostile + innocent[2:])
    finally:
        asyncio.run(engine.shutdown(1))
    together = crowd[:2] + crowd[2 + len(HOSTILE):]
    for a, b in zip(alone, together):
        assert_same(a, b)
    assert all(o.finish_reason == "length" and len(o.tokens) == 8 for o in crowd)


def test_a_fault_on_one_requests_row_fails_only_that_request(tiny_llama, tokenizer, monkeypatch):
    """A step that fails is run again in halves until the failing request is alone; every other request in
    the step (generate, seeded sampling, tag, classify) completes with exactly its normal output."""
    _, loaded = tiny_llama
    prompts = [make_prompt(loaded, "deep", "prefix", "generate", seed=2),
               make_prompt(loaded, "ner", "prefix", "tag", ["O", "B-ORG", "I-ORG"], seed=3),
               make_prompt(loaded, "topic", "prompt", "classify", ["sport", "news"], seed=4)]
    requests = [("deep", ids(6, 1), Task.GENERATE, greedy(10)), ("ner", ids(9, 2), Task.TAG, greedy(1)),
                ("deep", ids(7, 3), Task.GENERATE, SamplingParams(max_tokens=10, temperature=1.0, seed=3,
                                                                  ignore_eos=True)),
                ("topic", ids(5, 4), Task.CLASSIFY, greedy(1)), (None, ids(8, 5), Task.GENERATE, greedy(10))]
    poisoned = ("deep", ids(6, 6), Task.GENERATE, greedy(10))
    engine = new_engine(loaded, tokenizer, prompts)
    try:
        alone = [run(engine, [r])[0] for r in requests]
        real_run = engine.core.runner.run
        victims = []

        def run_with_a_bad_row(step):  # as a device error or a bad value on that request's row would
            if any(seq.prompt_ids == poisoned[1] and seq.output_ids for seq in step.sequences):
                victims.append(len(step.sequences))
                raise RuntimeError("bad value on a row")
            return real_run(step)

        monkeypatch.setattr(engine.core.runner, "run", run_with_a_bad_row)
        together = run(engine, requests[:2] + [poisoned] + requests[2:])
        after = run(engine, [requests[0]])[0]
    finally:
        asyncio.run(engine.shutdown(1))
    bad = together.pop(2)
    assert bad.finish_reason == "error" and "bad value on a row" in bad.error
    assert max(victims) > 1 and min(victims) == 1  # found inside a shared step, then alone
    for a, b in zip(alone, together):
        assert_same(a, b)
        assert b.finish_reason == a.finish_reason
    assert_same(after, alone[0])
    assert engine.stats().kv_blocks_used == 0


def test_deleting_and_recreating_a_prompt_while_requests_run(tiny_llama, tokenizer):
    """The same name and version number again with other tensors (delete, then re-create) while requests
    of the old one run: they finish on the prompt they started with; bookkeeping never compares prompts."""
    _, loaded = tiny_llama
    old = dataclasses.replace(make_prompt(loaded, "churn", "prompt", "generate", seed=1), version=1)
    new = dataclasses.replace(make_prompt(loaded, "churn", "prompt", "generate", seed=2), version=1)
    request = ("churn", ids(6, 3), Task.GENERATE, greedy(12))
    engine = new_engine(loaded, tokenizer, [old])
    try:
        want_old = run(engine, [request])[0]

        async def churn():
            seqs = [engine.make_sequence(*request) for _ in range(3)]
            tasks = [asyncio.ensure_future(engine.run_to_end(s)) for s in seqs]
            while engine.stats().generation_tokens_total < len(want_old.tokens) + 3:
                await asyncio.sleep(0.001)
            engine.remove_prompt("churn")
            engine.load_prompt(new)
            return await asyncio.gather(*tasks)

        outs = asyncio.run(churn())
        want_new = run(engine, [request])[0]
    finally:
        asyncio.run(engine.shutdown(1))
    for out in outs:
        assert_same(out, want_old)
    assert [t.token_id for t in want_new.tokens] != [t.token_id for t in want_old.tokens]


def test_the_queue_limit_counts_requests_not_their_inputs(tiny_llama, tokenizer):
    """A batch call with 40 inputs takes one place in the queue, as a call with one input does."""
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, [], max_waiting=3, kv_cache_bytes=1 << 18)  # a few slots: most wait

    async def go():
        big = [engine.make_sequence(None, ids(8, i), Task.GENERATE, greedy(20)) for i in range(40)]
        singles = [engine.make_sequence(None, ids(8, 100 + i), Task.GENERATE, greedy(5)) for i in range(4)]
        tasks = [asyncio.ensure_future(engine.run_group(big))]
        await asyncio.sleep(0.05)
        tasks += [asyncio.ensure_future(engine.run_group([s])) for s in singles]
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        big, *singles = asyncio.run(go())
    finally:
        asyncio.run(engine.shutdown(1))
    assert [len(o.tokens) for o in big] == [20] * 40
    served = [s for s in singles if not isinstance(s, Exception)]
    refused = [s for s in singles if isinstance(s, Overloaded)]
    assert len(served) >= 2 and len(served) + len(refused) == 4  # the 40 inputs took one of three places
    assert all(len(s[0].tokens) == 5 for s in served)


def test_cancelling_a_group_cancels_every_sequence_in_it(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, [])

    async def go():
        seqs = [engine.make_sequence(None, ids(8, i), Task.GENERATE, greedy(100)) for i in range(6)]
        task = asyncio.ensure_future(engine.run_group(seqs))
        while engine.stats().generation_tokens_total < 6:
            await asyncio.sleep(0.001)
        task.cancel()
        for _ in range(100):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        return engine.stats()

    try:
        stats = asyncio.run(go())
    finally:
        asyncio.run(engine.shutdown(1))
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


@pytest.mark.parametrize("tensor, value", [("head_weight", 1e38), ("prompt_embeddings", 1e30), ("head_bias", 1e5)])
def test_prompts_with_overflowing_values_are_refused(tiny_llama, tokenizer, tensor, value):
    _, loaded = tiny_llama
    pf = make_prompt(loaded, "huge", "prefix", "classify", ["a", "b"], seed=1)
    setattr(pf, tensor, torch.full_like(getattr(pf, tensor), value))
    engine = new_engine(loaded, tokenizer, [])
    try:
        with pytest.raises(ValueError, match=f"{tensor.replace('_w', '.w').replace('_b', '.b')} has values beyond"):
            engine.check_prompt(pf)
        engine.check_prompt(make_prompt(loaded, "fine", "prefix", "classify", ["a", "b"], seed=1))
    finally:
        asyncio.run(engine.shutdown(1))


def test_the_probe_forward_catches_what_the_value_bound_lets_through(tiny_llama, tokenizer, monkeypatch):
    """With the bound lifted, a head of 1e38 passes it; the probe forward still finds its infinite logits."""
    _, loaded = tiny_llama
    monkeypatch.setattr(task_prompt, "MAX_ABS_VALUE", float("inf"))
    pf = make_prompt(loaded, "huge", "prompt", "tag", ["O", "B-X"], seed=1)
    pf.head_weight = torch.full_like(pf.head_weight, 1e38)
    engine = new_engine(loaded, tokenizer, [])
    try:
        with pytest.raises(ValueError, match="makes the head's logits non-finite"):
            engine.check_prompt(pf)
    finally:
        asyncio.run(engine.shutdown(1))


def test_head_probabilities_stay_finite_for_any_head_output(tiny_llama):
    _, loaded = tiny_llama
    pf = make_prompt(loaded, "x", "prompt", "tag", ["O", "B-X", "I-X"], seed=1)
    prompt = task_prompt.build_task_prompt(loaded.model, pf, lambda text: [5])
    prompt.head_weight = torch.full_like(prompt.head_weight, 1e38)
    prompt.head_weight[1] = -1e38
    probs = prompt.head(torch.randn(4, loaded.args.hidden_size))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(4))
