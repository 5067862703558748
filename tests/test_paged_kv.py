"""Paged KV memory: shared task-prompt blocks, prefix caching, preemption, and no leaked blocks."""
from __future__ import annotations

import asyncio
import dataclasses
import random

import torch

from app.engine.sampling import SamplingParams
from prompt_store.format import Task
from tests.test_engine import assert_same, greedy, ids, make_prompt, new_engine, run


def prompts_for(loaded):
    return [make_prompt(loaded, "shallow", "prompt", "generate", seed=1),
            make_prompt(loaded, "deep", "prefix", "generate", seed=2),
            make_prompt(loaded, "ner", "prefix", "tag", ["O", "B-ORG", "I-ORG"], seed=3),
            make_prompt(loaded, "topic", "prompt", "classify", ["sport", "news"], seed=4)]


def logprob_request(name, tokens, n=6):
    return (name, tokens, Task.GENERATE, greedy(n, logprobs=5))


def assert_same_logprobs(a, b, tolerance=1e-4):
    assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    for x, y in zip(a.tokens, b.tokens):
        assert abs(x.logprob - y.logprob) < tolerance
        assert [i for i, _ in x.top] == [i for i, _ in y.top]


def test_a_request_served_from_cached_blocks_equals_one_computed_from_scratch(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    shared = ids(70, 1)  # a long common prefix (a system prompt), then different endings
    requests = [logprob_request(name, shared + ids(9 + i, 10 + i)) for i, name in
                enumerate(["deep", "deep", "shallow", None, "shallow"])]
    cold = new_engine(loaded, tokenizer, prompts_for(loaded), prefix_caching=False)
    warm = new_engine(loaded, tokenizer, prompts_for(loaded))
    try:
        want = [run(cold, [r])[0] for r in requests]
        got = [run(warm, [r])[0] for r in requests]  # one after the other: each finds its predecessors' blocks
        stats = warm.stats()
    finally:
        asyncio.run(cold.shutdown(1))
        asyncio.run(warm.shutdown(1))
    for a, b in zip(want, got):
        assert_same_logprobs(a, b)
    # The second "deep" and "shallow" requests reused the shared text's full blocks (P=5, blocks of 16:
    # positions 0..63 hold the prefix and the first 59 shared tokens).
    assert stats.prefix_cache_hits == 2 * (64 - 5)
    assert cold.stats().prefix_cache_hits == 0


def test_two_tasks_and_two_versions_never_share_text_blocks(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    text = ids(80, 2)
    engine = new_engine(loaded, tokenizer, prompts_for(loaded))
    try:
        run(engine, [logprob_request("deep", text)])
        hits_before = engine.stats().prefix_cache_hits
        other_task = run(engine, [logprob_request("shallow", text)])[0]
        assert engine.stats().prefix_cache_hits == hits_before  # same text, other prompt: nothing reused
        run(engine, [logprob_request("shallow", text)])
        assert engine.stats().prefix_cache_hits > hits_before  # same prompt and text: reused

        hits_before = engine.stats().prefix_cache_hits
        replaced = dataclasses.replace(make_prompt(loaded, "shallow", "prompt", "generate", seed=9), version=2)
        engine.load_prompt(replaced)
        new_version = run(engine, [logprob_request("shallow", text)])[0]
        assert engine.stats().prefix_cache_hits == hits_before  # a new version computes its own blocks
    finally:
        asyncio.run(engine.shutdown(1))
    fresh = new_engine(loaded, tokenizer, [replaced])
    try:
        want = run(fresh, [logprob_request("shallow", text)])[0]
    finally:
        asyncio.run(fresh.shutdown(1))
    assert_same_logprobs(new_version, want)
    assert [t.token_id for t in other_task.tokens] != [t.token_id for t in new_version.tokens]


def test_every_request_of_a_task_references_the_same_prompt_blocks(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    long_prompt = dataclasses.replace(make_prompt(loaded, "deep", "prefix", "generate", seed=2))
    long_prompt.num_virtual_tokens = 5  # (make_prompt's P; the check below is about blocks of 4)
    engine = new_engine(loaded, tokenizer, [long_prompt], block_size=4)  # P=5: one full prefix block + a tail

    async def go():
        seqs = [engine.make_sequence("deep", ids(6, i), Task.GENERATE, greedy(30)) for i in range(4)]
        tasks = [asyncio.ensure_future(engine.run_to_end(s)) for s in seqs]
        while engine.stats().generation_tokens_total < 8:
            await asyncio.sleep(0.001)
        tables = [list(s.block_table) for s in seqs]
        await asyncio.gather(*tasks)
        return tables

    try:
        tables = asyncio.run(go())
    finally:
        asyncio.run(engine.shutdown(1))
    assert len({t[0] for t in tables}) == 1  # the full prefix block: one copy for all four
    assert len({t[1] for t in tables}) == 4  # the tail block holds each request's own text: one each


def mixed_requests(n: int, seed: int) -> list[tuple]:
    """Streaming-sized generations (greedy and seeded sampling), tags and classifications, any task."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 5
        tokens = ids(rng.randint(3, 40), 1000 + i)
        if kind == 0:
            out.append((rng.choice(["shallow", "deep", None]), tokens, Task.GENERATE, greedy(rng.randint(5, 30))))
        elif kind == 1:
            out.append(("deep", tokens, Task.GENERATE, SamplingParams(max_tokens=rng.randint(5, 30), temperature=0.9,
                                                                      top_p=0.9, seed=i, ignore_eos=True)))
        elif kind == 2:
            out.append(("ner", tokens, Task.TAG, greedy(1)))
        elif kind == 3:
            out.append(("topic", tokens, Task.CLASSIFY, greedy(1)))
        else:
            out.append(("shallow", tokens, Task.GENERATE, greedy(rng.randint(20, 60), logprobs=2)))
    return out


def test_with_a_tiny_kv_pool_requests_are_preempted_and_give_exactly_their_outputs(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    requests = mixed_requests(50, 0)
    large = new_engine(loaded, tokenizer, prompts_for(loaded))
    block_bytes = 2 * loaded.args.num_layers * loaded.args.kv_width * 4 * 16
    small = new_engine(loaded, tokenizer, prompts_for(loaded), kv_cache_bytes=block_bytes * 12)  # 11 blocks usable
    try:
        want = run(large, requests)

        async def streamed():  # every request streams: each token must arrive exactly once
            seqs = [small.make_sequence(*r) for r in requests]

            async def collect(seq):
                chunks = [out async for out in small.stream(seq)]
                return chunks

            return await asyncio.gather(*(collect(s) for s in seqs))

        streams = asyncio.run(streamed())
        stats = small.stats()
    finally:
        asyncio.run(large.shutdown(1))
        asyncio.run(small.shutdown(1))
    assert stats.preemptions > 10 and large.stats().preemptions == 0
    for (name, tokens, mode, params), a, chunks in zip(requests, want, streams):
        b = chunks[-1]
        assert b.finished and b.finish_reason == a.finish_reason
        if mode == Task.GENERATE:
            got = [t.token_id for c in chunks for t in c.tokens]
            assert got == [t.token_id for t in a.tokens]  # each token once, in order
            assert "".join(c.text for c in chunks) == a.text
        else:
            assert (a.probs - b.probs).abs().max() < 1e-5
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


def test_no_block_leaks_after_a_thousand_random_requests_with_cancellations_and_prompt_churn(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    prompts = prompts_for(loaded)
    block_bytes = 2 * loaded.args.num_layers * loaded.args.kv_width * 4 * 16
    engine = new_engine(loaded, tokenizer, prompts, kv_cache_bytes=block_bytes * 40, max_batched_tokens=256,
                        max_waiting=1000)
    rng = random.Random(7)

    async def go():
        tasks = []
        for i, request in enumerate(mixed_requests(1000, 1)):
            name, tokens, mode, params = request
            params = dataclasses.replace(params, max_tokens=min(params.max_tokens, 8))
            timeout = 0.0 if i % 97 == 0 else None  # some expire before they run
            seq = engine.make_sequence(name, tokens, mode, params, timeout_s=timeout)
            task = asyncio.ensure_future(engine.run_to_end(seq))
            tasks.append(task)
            if i % 13 == 0:
                await asyncio.sleep(0.002)
                task.cancel()  # the client went away
            if i % 250 == 0:  # a new version of a prompt lands while requests run
                engine.load_prompt(dataclasses.replace(prompts[1], version=i + 1))
            if i % 50 == 0:
                await asyncio.sleep(0.01 * rng.random())
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(go())
        stats = engine.stats()
        refs = list(engine.core.blocks.ref_counts)
    finally:
        asyncio.run(engine.shutdown(1))
    finished = [r for r in results if not isinstance(r, BaseException)]
    cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
    assert len(finished) + len(cancelled) == 1000 and len(cancelled) > 50  # some finished before the cancel
    assert all(r.finish_reason in ("stop", "length", "timeout") for r in finished)
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert all(count == 0 for count in refs)  # every block free or cached, none referenced
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_a_request_that_can_never_fit_is_refused_at_submission(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, [])
    try:
        try:
            engine.make_sequence(None, ids(100, 0), Task.GENERATE, greedy(40))
        except ValueError as e:
            message = str(e)
    finally:
        asyncio.run(engine.shutdown(1))
    assert "exceed the context of 128" in message


def test_tag_outputs_do_not_depend_on_cached_text(tiny_llama, tokenizer):
    """Tagging needs every text token's hidden state, so a cached prefix of its text is recomputed."""
    _, loaded = tiny_llama
    text = ids(50, 3)
    engine = new_engine(loaded, tokenizer, prompts_for(loaded))
    try:
        first = run(engine, [("ner", text, Task.TAG, greedy(1))])[0]
        second = run(engine, [("ner", text, Task.TAG, greedy(1))])[0]
    finally:
        asyncio.run(engine.shutdown(1))
    assert first.probs.shape == second.probs.shape == (50, 3)
    assert torch.allclose(first.probs, second.probs, atol=1e-6)
    assert_same(first, second)


def test_prompt_loads_and_removals_run_on_the_engine_thread(tiny_llama, tokenizer, monkeypatch):
    """No other thread changes the engine's prompt cache (its LRU order included) or runs the model beside
    its steps."""
    import threading

    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, [])
    seen = []
    for method in ("serve", "add", "remove", "touch"):
        inner = getattr(engine.prompts, method)
        monkeypatch.setattr(engine.prompts, method,
                            lambda *a, inner=inner: seen.append(threading.current_thread().name) or inner(*a))
    try:
        engine.load_prompt(prompts_for(loaded)[0])
        served = run(engine, [("shallow", ids(5, 1), Task.GENERATE, greedy(3))])[0]
        engine.remove_prompt("shallow")
    finally:
        asyncio.run(engine.shutdown(1))
    assert len(seen) >= 2 and set(seen) == {"softserve-engine"}
    assert len(served.tokens) == 3 and "shallow" not in engine.prompts


def test_stored_prompts_load_on_first_use_within_the_memory_budget(tiny_llama, tokenizer):
    """Registering a prompt reads nothing; its first request reads the file and computes the prefix; past
    the budget the least recently used are unloaded, and come back (same outputs) when used again."""
    _, loaded = tiny_llama
    files = {f"p{i}": dataclasses.replace(make_prompt(loaded, f"p{i}", ["prompt", "prefix"][i % 2], "generate",
                                                      seed=i), version=1, digest=f"digest{i}") for i in range(40)}
    reads = []

    def reader(name):
        return lambda: reads.append(name) or files[name]

    reference = new_engine(loaded, tokenizer, [])
    engine = new_engine(loaded, tokenizer, [], prompt_cache_bytes=1)  # room for one loaded prompt at a time
    try:
        for name in files:
            engine.register_prompt(name, 1, f"digest{name[1:]}", reader(name))
        assert (len(engine.prompts), engine.prompts.num_built, reads) == (40, 0, [])
        request = lambda name: (name, ids(20, 3), Task.GENERATE, greedy(5, logprobs=2))  # noqa: E731
        first = run(engine, [request("p3")])[0]
        assert reads == ["p3"] and engine.prompts.num_built == 1
        run(engine, [request("p4")])
        assert reads == ["p3", "p4"] and engine.prompts.num_built == 1  # p3 unloaded to fit the budget
        hits = engine.stats().prefix_cache_hits
        again = run(engine, [request("p3")])[0]
        assert reads == ["p3", "p4", "p3"]
        assert engine.stats().prefix_cache_hits > hits  # the reloaded p3 found its cached blocks
        reference.load_prompt(files["p3"])
        want = run(reference, [request("p3")])[0]
    finally:
        asyncio.run(engine.shutdown(1))
        asyncio.run(reference.shutdown(1))
    assert_same_logprobs(first, want)
    assert_same_logprobs(again, want)
