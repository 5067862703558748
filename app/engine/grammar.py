"""Structured output: grammars compiled by xgrammar, one matcher per sequence that masks the tokens the
grammar does not allow next and follows the tokens the sequence picks.

Compiling takes milliseconds to minutes (a JSON schema with many properties or long enums): callers price the
grammar first (app/api/grammar_price.py) and compile in their own worker pool, which also caches compiled
grammars (app/grammars.py); so xgrammar's own cache is off, and each compile uses one thread.
"""
from __future__ import annotations

import json

import torch
import xgrammar as xgr

ANY_OBJECT = json.dumps({"type": "object"})  # json_object: a JSON object (strict_mode off: any properties)


class GrammarError(ValueError):
    """The schema, regex or choices cannot be compiled into a grammar."""


class Grammars:
    def __init__(self, hf_tokenizer, vocab_size: int):
        """vocab_size: the model's (its logits' width), which may exceed the tokenizer's."""
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size

    def compile(self, kind: str, source) -> xgr.CompiledGrammar:
        """kind: "json_object" (any JSON object), "json_schema" (source: the schema), "regex" (source: the
        pattern) or "choice" (source: the strings, exactly one of which is generated)."""
        try:
            if kind == "json_object":
                return self.compiler.compile_json_schema(ANY_OBJECT, strict_mode=False)
            if kind == "json_schema":
                return self.compiler.compile_json_schema(json.dumps(source), strict_mode=True)
            if kind == "regex":
                return self.compiler.compile_regex(source)
            if kind == "choice":
                return self.compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(choice) for choice in source))
        except (RuntimeError, ValueError) as e:  # xgrammar reports a bad schema or pattern as either
            raise GrammarError(f"cannot compile the {kind.replace('_', ' ')}: {e}") from e
        raise ValueError(f"unknown grammar kind {kind!r}")


class GrammarMatcher:
    """One sequence's position in its grammar (used on the engine thread only)."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, row: torch.Tensor) -> None:
        """Set the logits (V,) of the tokens the grammar does not allow next to -inf, in place."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(row[None], self.bitmask.to(row.device), vocab_size=self.vocab_size)

    def accept(self, token_id: int) -> None:
        self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """The grammar is complete and its end (the end-of-sequence token) was accepted."""
        return self.matcher.is_terminated()
