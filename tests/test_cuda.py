"""The GPU path's correctness on CUDA: logits against transformers', the engine with CUDA graphs (and the
Triton decode kernel where it works) against the engine without, a seeded request alone and in a crowd, and
the tiny benchmark against HF generate(). Tiny random-weight shapes only: no model download.

On a GPU machine: python -m pytest -m cuda tests/test_cuda.py
"""
from pathlib import Path

import pytest
import torch

from app import LLM
from app.bench.run import BenchConfig, run_bench
from app.bench.workload import NullTokenizer, build_models, prompt_files, prompt_tensors
from app.engine.engine import EngineConfig
from app.engine.model import DenseAttention
from app.engine.sampling import SamplingParams
from prompt_store.format import Task

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]

CONFIG = dict(max_seq_len=128, kv_cache_bytes=1 << 26)


def tiny(dtype: torch.dtype):
    return build_models("tiny", "cuda", dtype, Path("."))


def engine(models, files, static_decode: bool) -> LLM:
    llm = LLM.from_model(models.ours, NullTokenizer(), EngineConfig(**CONFIG, static_decode=static_decode))
    for pf in files:
        llm.load_prompt(pf)
    return llm


def mixed_requests(models) -> list[tuple]:
    """Unequal lengths and max_tokens: requests finish at different times, leaving holes in the batch."""
    g = torch.Generator().manual_seed(3)
    requests = []
    for i in range(24):
        ids = torch.randint(3, models.args.vocab_size, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g)
        params = SamplingParams(max_tokens=4 + 5 * (i % 4), temperature=0, ignore_eos=True, logprobs=2)
        requests.append((["t0", "t1", "t2", None][i % 4], ids.tolist(), Task.GENERATE, params))
    return requests


def with_and_without_graphs(dtype: torch.dtype):
    """The same requests through the eager engine and the graph-replaying one; and how many steps replayed."""
    models = tiny(dtype)
    files = prompt_files(models, prompt_tensors(models.args, 5))
    requests = mixed_requests(models)
    with engine(models, files, static_decode=False) as llm:
        eager = llm.run(requests)
    replays = []
    with engine(models, files, static_decode=True) as llm:
        static = llm.engine.core.runner.static
        inner = static.run
        static.run = lambda *a: replays.append(1) or inner(*a)
        graphs = llm.run(requests)
    return eager, graphs, len(replays)


def test_logits_match_transformers_fp32():
    models = tiny(torch.float32)
    ids = torch.randint(3, models.args.vocab_size, (3, 17), device="cuda")
    with torch.inference_mode():
        ref = models.hf(input_ids=ids).logits
        positions = torch.arange(17, device="cuda")[None].expand(3, -1)
        ours = models.ours.logits(models.ours(positions, DenseAttention(), tokens=ids))
    assert (ours - ref).abs().max().item() < 1e-4


def test_cuda_graphs_give_the_eager_tokens_and_logprobs_fp32():
    eager, graphs, replays = with_and_without_graphs(torch.float32)
    assert [[t.token_id for t in o.tokens] for o in graphs] == [[t.token_id for t in o.tokens] for o in eager]
    assert max(abs(x.logprob - y.logprob) for a, b in zip(eager, graphs) for x, y in zip(a.tokens, b.tokens)) < 1e-4
    assert replays > 10


def test_cuda_graphs_replay_in_bf16():
    """bf16: different GEMM shapes round differently, so only the replay itself is asserted."""
    _, _, replays = with_and_without_graphs(torch.bfloat16)
    assert replays > 10


def test_a_seeded_request_is_the_same_alone_and_in_a_crowd_under_graphs():
    models = tiny(torch.float32)
    files = prompt_files(models, prompt_tensors(models.args, 5))
    requests = mixed_requests(models)
    sampled = dict(max_tokens=12, temperature=0.9, top_p=0.95, ignore_eos=True)
    mine = ("t1", requests[0][1], Task.GENERATE, SamplingParams(seed=1234, **sampled))
    crowd = [(r[0], r[1], Task.GENERATE, SamplingParams(**sampled)) for r in requests[1:9]]
    with engine(models, files, static_decode=True) as llm:
        alone = llm.run([mine])[0]
    with engine(models, files, static_decode=True) as llm:
        crowded = llm.run(crowd[:4] + [mine] + crowd[4:])[4]
    assert [t.token_id for t in crowded.tokens] == [t.token_id for t in alone.tokens]


def test_the_tiny_bench_agrees_with_hf_generate_fp32():
    r = run_bench(BenchConfig(shape="tiny", n=24, new=16, device="cuda", dtype="float32", progress=False))
    assert r["agreement"]["agree_all"] == r["agreement"]["requests"] == 24
