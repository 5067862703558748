"""The continuously-batched engine: any mix of tasks in one batch gives each request what it gets alone;
seeded sampling, cancellation, overload, deadlines, stop strings, chunked prefill, prompt versions."""
from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from app.engine import engine as engine_module
from app.engine.engine import AsyncEngine, EngineConfig
from app.engine.llm_engine import LLMEngine
from app.engine.request import InvalidRequest, Overloaded, PromptNotFound, WrongTaskType
from app.engine.sampling import SamplingParams
from app.engine.sequence import Output
from app.engine import task_prompt
from app.engine.weights import base_identity
from app.services import connect_registry
from prompt_store.format import PromptFile, Task, embedding_width
from prompt_store.registry import PromptRegistry

P = 5


def make_prompt(loaded, name, kind, task, labels=(), head=True, seed=0) -> PromptFile:
    a = loaded.args
    g = torch.Generator().manual_seed(seed)
    width = embedding_width(kind, a)
    head_w = torch.randn(len(labels), a.hidden_size, generator=g) if labels and head else None
    head_b = torch.randn(len(labels), generator=g) if head_w is not None else None
    return PromptFile(name=name, kind=kind, task=task, num_virtual_tokens=P, labels=list(labels), description="",
                      base=base_identity(loaded), prompt_embeddings=torch.randn(P, width, generator=g),
                      head_weight=head_w, head_bias=head_b)


@pytest.fixture(scope="module")
def prompts(tiny_llama):
    _, loaded = tiny_llama
    return [
        make_prompt(loaded, "shallow", "prompt", "generate", seed=1),
        make_prompt(loaded, "deep", "prefix", "generate", seed=2),
        make_prompt(loaded, "ner", "prefix", "tag", ["O", "B-ORG", "I-ORG"], seed=3),
        make_prompt(loaded, "topic", "prompt", "classify", ["sport", "news"], seed=4),
        make_prompt(loaded, "spam", "prompt", "classify", ["spam", "ham"], head=False, seed=5),
    ]


def new_engine(loaded, tokenizer, prompts, **config) -> AsyncEngine:
    engine = AsyncEngine(loaded.model, tokenizer, EngineConfig(**({"max_seq_len": 128, "kv_cache_bytes": 1 << 24}
                                                                   | config)))
    for pf in prompts:
        engine.load_prompt(pf)
    engine.start()
    return engine


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n=8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


REQUESTS = [  # (prompt, input length, mode)
    ("shallow", 9, Task.GENERATE), ("deep", 4, Task.GENERATE), (None, 13, Task.GENERATE),
    ("ner", 7, Task.TAG), ("topic", 11, Task.CLASSIFY), ("spam", 6, Task.CLASSIFY),
    ("deep", 20, Task.GENERATE), ("shallow", 2, Task.GENERATE),
]


def run(engine, requests):
    async def go():
        seqs = [engine.make_sequence(name, tokens, mode, params) for name, tokens, mode, params in requests]
        return await asyncio.gather(*(engine.run_to_end(s) for s in seqs))
    return asyncio.run(go())


def assert_same(a, b):
    assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    assert a.text == b.text
    if a.probs is not None or b.probs is not None:
        assert (a.probs - b.probs).abs().max() < 1e-5


def test_the_synchronous_engine_stepped_by_hand_gives_what_the_async_engine_gives(tiny_llama, tokenizer, prompts):
    """LLMEngine alone (no thread, no event loop): add the sequences, step until none is left."""
    _, loaded = tiny_llama
    requests = [(name, ids(n, i), mode, greedy(6 + i)) for i, (name, n, mode) in enumerate(REQUESTS)]
    engine = new_engine(loaded, tokenizer, prompts)
    try:
        want = run(engine, requests)
    finally:
        asyncio.run(engine.shutdown(1))
    core = LLMEngine(loaded.model, tokenizer, EngineConfig(max_seq_len=128, kv_cache_bytes=1 << 24))
    for pf in prompts:
        core.prompts.load(pf)
    seqs = [core.make_sequence(*r) for r in requests]
    core.add(seqs)
    got = {seq.request_id: Output(seq.request_id) for seq in seqs}  # each request's outputs concatenated
    while core.has_work:
        for out in core.step():
            total = got[out.request_id]
            got[out.request_id] = dataclasses.replace(out, text=total.text + out.text, tokens=total.tokens + out.tokens)
    for seq, expected in zip(seqs, want):
        assert got[seq.request_id].finished and got[seq.request_id].finish_reason == expected.finish_reason
        assert_same(got[seq.request_id], expected)
    assert core.stats().kv_blocks_used == 0


@pytest.mark.parametrize("static_decode", [False, True], ids=["dynamic", "static"])
def test_mixed_batch_with_late_arrivals_equals_each_request_alone(tiny_llama, tokenizer, prompts, static_decode):
    _, loaded = tiny_llama
    requests = [(name, ids(n, i), mode, greedy(6 + i)) for i, (name, n, mode) in enumerate(REQUESTS)]
    engine = new_engine(loaded, tokenizer, prompts, static_decode=static_decode)
    try:
        alone = [run(engine, [r])[0] for r in requests]

        async def staggered():  # half start together; the rest join while the first are mid-generation
            first = [engine.make_sequence(*r) for r in requests[:4]]
            tasks = [asyncio.ensure_future(engine.run_to_end(s)) for s in first]
            while engine.stats().generation_tokens_total < 3 + sum(len(o.tokens) for o in alone):
                await asyncio.sleep(0.001)
            later = [engine.make_sequence(*r) for r in requests[4:]]
            tasks += [asyncio.ensure_future(engine.run_to_end(s)) for s in later]
            return await asyncio.gather(*tasks)

        together = asyncio.run(staggered())
    finally:
        asyncio.run(engine.shutdown(1))
    for a, b in zip(alone, together):
        assert_same(a, b)
    assert together[3].probs.shape == (7, 3) and together[4].probs.shape == (2,)


async def arrive_apart(engine: AsyncEngine, seqs: list, gap_s: float = 0.05) -> list:
    """Submit the sequences gap_s apart, as clients of a burst arrive, and wait for all of them."""
    tasks = []
    for seq in seqs:
        tasks.append(asyncio.ensure_future(engine.run_to_end(seq)))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks)


def test_an_idle_engine_lets_a_burst_of_requests_arrive_and_starts_them_in_one_step(tiny_llama, tokenizer, prompts,
                                                                                   monkeypatch):
    """Clients of a burst arrive a little apart (each parsed and tokenized first). An idle engine waits while
    they keep coming, so its first step takes all of them; a step for the first alone would make the rest wait
    for it. The quiet period is stretched here so that a loaded test machine cannot split the burst."""
    monkeypatch.setattr(engine_module, "BURST_QUIET_S", 0.3)
    monkeypatch.setattr(engine_module, "BURST_WINDOW_S", 5.0)
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, prompts)
    steps = []
    engine.core.on_step = lambda sequences, tokens: steps.append((sequences, tokens))
    requests = [(None, ids(5 + i, i), Task.GENERATE, greedy(3)) for i in range(5)]
    try:  # 50 ms apart: each would find the engine mid-step of the ones before
        outputs = asyncio.run(arrive_apart(engine, [engine.make_sequence(*r) for r in requests]))
    finally:
        asyncio.run(engine.shutdown(1))
    assert steps[0] == (5, sum(5 + i for i in range(5)))  # every request's whole prompt in the first step
    assert all(len(o.tokens) == 3 for o in outputs)


def test_a_burst_that_needs_more_than_one_step_starts_shortest_prompt_first(tiny_llama, tokenizer, prompts,
                                                                            monkeypatch):
    """The burst's long prompt arrives first, then three short ones. A step of 32 tokens holds the three short
    prompts and the start of the long one: the short requests get their first token in the first step, the long
    one in the second, where it would have had it anyway (in arrival order the short ones would wait for it)."""
    monkeypatch.setattr(engine_module, "BURST_QUIET_S", 0.3)
    monkeypatch.setattr(engine_module, "BURST_WINDOW_S", 5.0)
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, prompts, max_batched_tokens=32)
    seqs = [engine.make_sequence(None, ids(n, 20 + i), Task.GENERATE, greedy(3)) for i, n in enumerate((30, 6, 5, 7))]
    started = []  # at each step's end, before its tokens are appended: which requests have a first token so far
    engine.core.on_step = lambda sequences, tokens: started.append([bool(s.output_ids) for s in seqs])
    try:
        outputs = asyncio.run(arrive_apart(engine, seqs))
    finally:
        asyncio.run(engine.shutdown(1))
    assert started[1] == [False, True, True, True]  # after the first step
    assert started[2] == [True, True, True, True]  # after the second
    assert all(len(o.tokens) == 3 for o in outputs)


def test_static_decode_steps_give_the_dynamic_paths_logprobs(tiny_llama, tokenizer, prompts):
    """Static-shape decode (rows padded to a bucket, padded key length; what CUDA graphs replay on a GPU)
    against the exact path, with requests finishing at different times so the batch shrinks and grows."""
    _, loaded = tiny_llama
    gen = [(name, n) for name, n, mode in REQUESTS if mode == Task.GENERATE]
    requests = [(name, ids(n, 50 + i), Task.GENERATE, greedy(4 + 5 * (i % 3), logprobs=3))
                for i, (name, n) in enumerate(gen * 2)]
    outputs, static_steps = {}, []
    for static in (False, True):
        engine = new_engine(loaded, tokenizer, prompts, static_decode=static)
        if static:
            inner = engine.core.runner.static.run
            engine.core.runner.static.run = lambda *a: static_steps.append(len(a[0])) or inner(*a)
        try:
            outputs[static] = run(engine, requests)
        finally:
            asyncio.run(engine.shutdown(1))
    assert len(static_steps) >= 10 and max(static_steps) >= 8  # decode steps ran static, over many rows
    for dynamic, static in zip(outputs[False], outputs[True]):
        assert [t.token_id for t in dynamic.tokens] == [t.token_id for t in static.tokens]
        for a, b in zip(dynamic.tokens, static.tokens):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [i for i, _ in a.top] == [i for i, _ in b.top]


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(tiny_llama, tokenizer, prompts):
    _, loaded = tiny_llama
    params = dict(max_tokens=10, temperature=0.9, top_p=0.95, top_k=200, ignore_eos=True)
    mine = ("shallow", ids(8, 99), Task.GENERATE, SamplingParams(seed=1234, **params))
    engine = new_engine(loaded, tokenizer, prompts)
    try:
        alone = run(engine, [mine])[0]
        companions = [("deep", ids(5 + i, i), Task.GENERATE, SamplingParams(**params)) for i in range(5)]
        crowded = run(engine, companions[:2] + [mine] + companions[2:])[2]
        other_seed = run(engine, [mine[:3] + (SamplingParams(seed=4321, **params),)])[0]
    finally:
        asyncio.run(engine.shutdown(1))
    assert [t.token_id for t in alone.tokens] == [t.token_id for t in crowded.tokens]
    assert [t.token_id for t in alone.tokens] != [t.token_id for t in other_seed.tokens]


def test_200_concurrent_requests_all_finish_and_memory_returns_to_idle(tiny_llama, tokenizer, prompts):
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, prompts, max_waiting=256)
    names = ["shallow", "deep", None]
    requests = [(names[i % 3], ids(3 + i % 17, i), Task.GENERATE, greedy(1 + i % 5)) for i in range(200)]
    try:
        outs = run(engine, requests)
        stats = engine.stats()
    finally:
        asyncio.run(engine.shutdown(1))
    assert [len(o.tokens) for o in outs] == [1 + i % 5 for i in range(200)]
    assert all(o.finish_reason == "length" for o in outs)
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


def test_cancelling_mid_stream_frees_its_slot_and_the_rest_finish(tiny_llama, tokenizer, prompts):
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, prompts)

    async def go():
        long = engine.make_sequence("deep", ids(10, 1), Task.GENERATE, greedy(100))
        others = [engine.make_sequence("shallow", ids(6, 2 + i), Task.GENERATE, greedy(30)) for i in range(3)]
        rest = [asyncio.ensure_future(engine.run_to_end(s)) for s in others]
        stream = engine.stream(long)
        received = [await anext(stream) for _ in range(3)]
        held = list(long.block_table)
        await stream.aclose()  # the client went away
        for _ in range(200):
            if not long.block_table:
                break
            await asyncio.sleep(0.01)
        freed = [engine.core.blocks.ref_counts[b] == 0 for b in held]
        return received, held, freed, long, await asyncio.gather(*rest)

    try:
        received, held, freed, long, rest = asyncio.run(go())
    finally:
        asyncio.run(engine.shutdown(1))
    assert len(received) == 3 and not received[-1].finished
    assert held and not long.block_table and all(freed)
    assert all(len(o.tokens) == 30 for o in rest)
    assert engine.stats().kv_blocks_used == 0


def test_overload_is_refused_cleanly_then_the_engine_serves_again(tiny_llama, tokenizer, prompts):
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, prompts, max_waiting=3, kv_cache_bytes=1 << 18)

    async def burst():
        seqs = [engine.make_sequence("shallow", ids(8, i), Task.GENERATE, greedy(20)) for i in range(12)]
        return await asyncio.gather(*(engine.run_to_end(s) for s in seqs), return_exceptions=True)

    try:
        results = asyncio.run(burst())
        after = run(engine, [("deep", ids(4, 0), Task.GENERATE, greedy(3))])[0]
    finally:
        asyncio.run(engine.shutdown(1))
    refused = [r for r in results if isinstance(r, Overloaded)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and served and len(refused) + len(served) == 12
    assert "capacity" in str(refused[0])
    assert all(len(r.tokens) == 20 for r in served)
    assert len(after.tokens) == 3 and engine.stats().kv_blocks_used == 0


def test_deadline_and_stop_strings(tiny_llama, tokenizer, prompts):
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, prompts)
    try:
        full = run(engine, [("shallow", ids(5, 7), Task.GENERATE, greedy(12))])[0]
        stop = full.text[len(full.text) // 2:][:2]
        cut = run(engine, [("shallow", ids(5, 7), Task.GENERATE, greedy(12, stop=[stop]))])[0]

        async def expired():
            seq = engine.make_sequence("deep", ids(5, 1), Task.GENERATE, greedy(100), timeout_s=0.0)
            return await engine.run_to_end(seq)

        late = asyncio.run(expired())
    finally:
        asyncio.run(engine.shutdown(1))
    assert stop and cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert late.finish_reason == "timeout" and engine.stats().kv_blocks_used == 0


def test_chunked_prefill_gives_the_unchunked_result(tiny_llama, tokenizer, prompts):
    _, loaded = tiny_llama
    requests = [("deep", ids(50, 3), Task.GENERATE, greedy(5)), ("ner", ids(40, 4), Task.TAG, greedy(1)),
                ("shallow", ids(33, 5), Task.GENERATE, greedy(5))]
    whole = new_engine(loaded, tokenizer, prompts)
    chunked = new_engine(loaded, tokenizer, prompts, max_batched_tokens=16)
    try:
        want, got = run(whole, requests), run(chunked, requests)
    finally:
        asyncio.run(whole.shutdown(1))
        asyncio.run(chunked.shutdown(1))
    for a, b in zip(want, got):
        assert_same(a, b)


def test_a_prefix_is_computed_once_and_a_request_keeps_its_version(tiny_llama, tokenizer, prompts, monkeypatch):
    _, loaded = tiny_llama
    passes = []  # forward passes over virtual tokens
    compute = task_prompt.prefix_kv
    monkeypatch.setattr(task_prompt, "prefix_kv", lambda *a: passes.append(1) or compute(*a))
    v1 = dataclasses.replace(prompts[0], version=1)
    v2 = dataclasses.replace(make_prompt(loaded, "shallow", "prompt", "generate", seed=77), version=2)
    engine = new_engine(loaded, tokenizer, [])
    try:
        before = len(passes)
        engine.load_prompt(v1)
        request = ("shallow", ids(6, 5), Task.GENERATE, greedy(8))
        alone_v1 = run(engine, [request] * 3)[0]
        assert len(passes) == before + 1  # three requests, one pass over the virtual tokens

        async def replaced_while_admitted():
            seq = engine.make_sequence(*request)  # resolves v1
            engine.load_prompt(v2)  # an upload lands before the request runs
            return await engine.run_to_end(seq)

        kept = asyncio.run(replaced_while_admitted())
        alone_v2 = run(engine, [request])[0]
    finally:
        asyncio.run(engine.shutdown(1))
    assert_same(kept, alone_v1)
    assert [t.token_id for t in alone_v2.tokens] != [t.token_id for t in alone_v1.tokens]


def test_an_upload_is_built_once_on_the_engine_thread_and_served_as_built(tiny_llama, tokenizer, tmp_path,
                                                                         monkeypatch):
    """The upload pipeline (app/api/prompts.py) at the engine: validated by the store, built on the engine
    thread between two steps while another request runs, stored, then served as built: its first request reads
    no file and computes no prefix."""
    _, loaded = tiny_llama
    registry = PromptRegistry(tmp_path, base_identity(loaded))
    engine = new_engine(loaded, tokenizer, [])
    connect_registry(registry, engine, interval_s=3600)
    stepping = threading.Event()
    step = engine.core.step

    def watched_step():
        stepping.set()
        try:
            return step()
        finally:
            stepping.clear()

    builds, reads = [], []  # (thread, whether a step was running) per prefix computed; files read from the store
    compute, read = task_prompt.prefix_kv, registry.get
    monkeypatch.setattr(engine.core, "step", watched_step)
    monkeypatch.setattr(task_prompt, "prefix_kv",
                        lambda *a: builds.append((threading.current_thread().name, stepping.is_set())) or compute(*a))
    monkeypatch.setattr(registry, "get", lambda *a: reads.append(a) or read(*a))
    pf = make_prompt(loaded, "uploaded", "prompt", "generate", seed=8)

    async def upload_while_serving():
        other = asyncio.ensure_future(engine.run_to_end(engine.make_sequence(None, ids(8, 1), Task.GENERATE,
                                                                              greedy(30))))
        registry.validate(pf)
        built = await asyncio.to_thread(engine.check_prompt, pf)
        info = await asyncio.to_thread(registry.add_and_describe, pf)
        await asyncio.to_thread(engine.adopt_prompt, task_prompt.as_stored(built, info.version, info.digest))
        served = await asyncio.to_thread(engine.get_prompt, "uploaded")
        out = await engine.run_to_end(engine.make_sequence(served, ids(6, 2), Task.GENERATE, greedy(4)))
        return built, info, served, out, await other

    try:
        built, info, served, out, other = asyncio.run(upload_while_serving())
    finally:
        registry.stop_watching()
        asyncio.run(engine.shutdown(1))
    assert builds == [("softserve-engine", False)] and reads == []
    assert served.key == ("uploaded", 1, info.digest) and served.k is built.k and served.v is built.v
    assert (len(out.tokens), len(other.tokens)) == (4, 30)


def test_bad_requests_are_refused_with_reasons(tiny_llama, tokenizer, prompts):
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, prompts)
    try:
        with pytest.raises(PromptNotFound, match="no prompt named 'nope'"):
            engine.make_sequence("nope", [5], Task.GENERATE, greedy())
        with pytest.raises(WrongTaskType, match="'ner' is a 'tag' prompt, not 'classify'"):
            engine.make_sequence("ner", [5], Task.CLASSIFY, greedy())
        with pytest.raises(InvalidRequest, match="exceed the context of 128"):
            engine.make_sequence("deep", ids(100, 0), Task.GENERATE, greedy(40))
        with pytest.raises(InvalidRequest, match="empty"):
            engine.make_sequence(None, [], Task.GENERATE, greedy())
    finally:
        asyncio.run(engine.shutdown(1))


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny_llama, tokenizer, prompts,
                                                                        monkeypatch):
    _, loaded = tiny_llama
    engine = new_engine(loaded, tokenizer, prompts)
    real_run = engine.core.runner.run
    calls = {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return real_run(step)

    monkeypatch.setattr(engine.core.runner, "run", flaky)
    try:
        failed = run(engine, [("deep", ids(6, 1), Task.GENERATE, greedy(10))])[0]
        after = run(engine, [("deep", ids(6, 1), Task.GENERATE, greedy(3))])[0]
    finally:
        asyncio.run(engine.shutdown(1))
    assert failed.finish_reason == "error" and "device fell over" in failed.error
    assert len(after.tokens) == 3 and engine.stats().kv_blocks_used == 0
