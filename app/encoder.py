"""Tokenization and chat-template rendering off the event loop, with a cheap length check first.

Tokenizing a long text takes seconds (3 MB: about 3 s on one core); on the event loop that would stall
/health and every stream for as long. So every call runs in a small thread pool owned by the server (the
Rust tokenizer releases the GIL while it works). Before that, a text that can never fit is refused at
once: no vocabulary entry is longer than `longest_token_chars` characters, so a text longer than
`max_seq_len * longest_token_chars` characters has more than `max_seq_len` tokens.
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

from app.engine.request import InvalidRequest
from app.engine.tokenizer import Tokenizer


class TextError(InvalidRequest):
    """A text that cannot be tokenized as it is; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class TextTooLong(TextError):
    """A text that cannot fit in the context whatever its tokens."""


class UnencodableText(TextError):
    """A text that is not Unicode text: a lone surrogate (which JSON's \\ud800 escapes can carry) has no
    UTF-8 form, so no tokenizer can read it."""


def longest_token_chars(tokenizer: Tokenizer) -> int | None:
    """The most characters of text one token can stand for; None when the tokenizer normalizes the text
    first (a normalizer may merge characters, e.g. NFC, so no such bound holds)."""
    backend = getattr(tokenizer.hf, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    # Byte-level and SentencePiece vocabularies spell each token with at least one character per text
    # character it covers (a byte-level token has one character per byte, and a character is >= 1 byte).
    return max(len(token) for token in tokenizer.hf.convert_ids_to_tokens(list(range(len(tokenizer.hf)))))


class TextEncoder:
    def __init__(self, tokenizer: Tokenizer, max_seq_len: int, threads: int):
        self.tokenizer = tokenizer
        longest = longest_token_chars(tokenizer)
        self.max_chars = None if longest is None else max_seq_len * longest
        self.max_seq_len = max_seq_len
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="softserve-tokenize")

    def check_length(self, chars: int, param: str) -> None:
        """TextTooLong (400) at once for a text too long to ever fit in the context."""
        if self.max_chars is not None and chars > self.max_chars:
            raise TextTooLong(f"{param} has {chars} characters, more than the {self.max_chars} that can fit in "
                              f"the context of {self.max_seq_len} tokens; shorten it", param)

    @staticmethod
    def check_encodable(text: str, param: str) -> None:
        """UnencodableText (400) for a text with no UTF-8 form."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UnencodableText(f"{param} is not valid Unicode text: {e.reason} at character {e.start}",
                                  param) from None

    def check_text(self, text: str, param: str) -> None:
        self.check_length(len(text), param)
        self.check_encodable(text, param)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def encode(self, text: str, param: str) -> list[int]:
        self.check_text(text, param)
        return await self._run(self.tokenizer.encode, text)

    async def encode_with_offsets(self, text: str, param: str) -> tuple[list[int], list[tuple[int, int]]]:
        self.check_text(text, param)
        return await self._run(self.tokenizer.encode_with_offsets, text)

    async def chat(self, messages: list[dict], param: str = "messages", tools: list[dict] | None = None) -> list[int]:
        """Token ids of the rendered conversation (tools: passed to the template). The template only adds
        text, so the contents bound it, and it marks every message with at least one token, so does their
        number."""
        if len(messages) > self.max_seq_len:
            raise TextTooLong(f"{param} has {len(messages)} messages, more than can fit in the context of "
                              f"{self.max_seq_len} tokens", param)
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        self.check_length(chars + (len(json.dumps(tools)) if tools else 0), param)
        for i, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    self.check_encodable(value, f"{param}.{i}.{key}")
        return await self._run(self.tokenizer.apply_chat_template, messages, tools)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
