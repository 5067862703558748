"""Structured output's cost per generated token: the same chat requests constrained by a JSON schema
(xgrammar masks) and free with exactly the same output lengths, through one AsyncEngine (each run's wall time
includes its prefill); plus the grammar work alone (mask fill, mask apply, advance) per token. Prints a
table and writes JSON.

    python -m app.bench.structured --batch 1 8 --json bench_results/structured.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from app.bench.ours import engine_config
from app.config import Settings, add_setting_flags, describe
from app.engine.engine import AsyncEngine
from app.engine.grammar import GrammarMatcher, Grammars
from app.engine.sampling import SamplingParams
from app.engine.tokenizer import Tokenizer
from app.engine.weights import load_model
from prompt_store.format import Task

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "city": {"type": "string", "maxLength": 40}, "hobbies": {"type": "array", "maxItems": 3, "items": {"type": "string",
                                                                                       "maxLength": 30}}},
    "required": ["name", "age", "city", "hobbies"]}
QUESTION = "Describe a made-up person as JSON with name, age, city and a list of hobbies."
MAX_SEQ_LEN = 512  # positions per request, room for the chat-templated QUESTION (50 tokens) and --new


async def _batch(engine: AsyncEngine, ids: list[int], lengths: list[int], compiled, vocab: int):
    """(seconds, generated tokens, outputs) of one copy per entry of `lengths` at once, each at most that many
    tokens, sampled; free rows (compiled None) generate exactly that many (ignore_eos)."""
    seqs = []
    for i, new in enumerate(lengths):
        params = SamplingParams(max_tokens=new, temperature=0.7, seed=i, ignore_eos=compiled is None)
        seq = engine.make_sequence(None, ids, Task.GENERATE, params)
        if compiled is not None:
            seq.grammar = GrammarMatcher(compiled, vocab)
        seqs.append(seq)
    start = time.perf_counter()
    outs = await engine.run_group(seqs)
    return time.perf_counter() - start, sum(o.completion_tokens for o in outs), outs


def grammar_only(grammars: Grammars, outs, vocab: int) -> float:
    """Microseconds of grammar work per token, replaying the constrained outputs' tokens."""
    tokens, start = 0, time.perf_counter()
    row = torch.zeros(vocab)
    for out in outs:
        matcher = GrammarMatcher(grammars.compile("json_schema", SCHEMA), vocab)
        for choice in out.tokens:
            matcher.mask(row)
            matcher.accept(choice.token_id)
            tokens += 1
    return (time.perf_counter() - start) / tokens * 1e6


def main() -> None:
    """The entry point: the settings (SOFTSERVE_*, then --model/--cache-dir) are built once, here."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_flags(parser, ("--model", "--cache-dir"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=int, default=96, help="max tokens per request")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest counts (a shared machine)")
    parser.add_argument("--json", type=Path, default=Path("bench_results/structured.json"))
    try:
        settings = Settings()
        args = parser.parse_args()
        settings = settings.with_flags(args)
    except ValidationError as e:
        sys.exit(f"structured: {describe(e)}")
    run(args, settings)


def run(args: argparse.Namespace, settings: Settings) -> None:
    """On CPU in float32: the model and its cache from `settings`, max_batched_tokens the server's."""
    loaded = load_model(settings.model, torch.float32, "cpu", settings.cache_dir)
    tokenizer = Tokenizer(loaded.directory)
    vocab = loaded.args.vocab_size
    engine = AsyncEngine(loaded.model, tokenizer, engine_config(loaded.model, max(args.batch), MAX_SEQ_LEN,
                                                                max_batched_tokens=settings.max_batched_tokens,
                                                                static_decode=False))
    start = time.perf_counter()
    grammars = Grammars(tokenizer.hf, vocab)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = grammars.compile("json_schema", SCHEMA)
    compile_s = time.perf_counter() - start
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    rows = []

    async def run():
        engine.start()
        try:
            await _batch(engine, ids, [8], compiled, vocab)  # warm-up
            for batch in args.batch:
                # constrained first; then free rows of exactly the same lengths, so both do the same work
                json_s, json_n, outs = min([await _batch(engine, ids, [args.new] * batch, compiled, vocab)
                                            for _ in range(args.repeat)], key=lambda r: r[0] / r[1])
                lengths = [o.completion_tokens for o in outs]
                free_s, free_n, _ = min([await _batch(engine, ids, lengths, None, vocab)
                                         for _ in range(args.repeat)], key=lambda r: r[0] / r[1])
                valid = sum(_parses(o.text) for o in outs)
                rows.append({"batch": batch, "free_ms_per_token": free_s / free_n * 1e3 * batch,
                             "json_ms_per_token": json_s / json_n * 1e3 * batch, "free_tokens": free_n,
                             "json_tokens": json_n, "json_valid": f"{valid}/{batch}",
                             "grammar_us_per_token": grammar_only(grammars, outs, vocab)})
        finally:
            await engine.shutdown(0)

    asyncio.run(run())
    print(f"tokenizer info {setup_s * 1e3:.0f} ms once; schema compile {compile_s * 1e3:.1f} ms (cached after)")
    print("| batch | free ms/token/seq | json_schema ms/token/seq | overhead | grammar work us/token | valid JSON |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['free_ms_per_token']:.1f} | {r['json_ms_per_token']:.1f} | "
              f"{r['json_ms_per_token'] / r['free_ms_per_token'] - 1:+.0%} | {r['grammar_us_per_token']:.0f} | "
              f"{r['json_valid']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                     "torch": torch.__version__, "setup_ms": setup_s * 1e3,
                                     "compile_ms": compile_s * 1e3, "rows": rows}, indent=2))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
