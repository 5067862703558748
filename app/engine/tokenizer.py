"""Tokenizer, chat template, stop ids and incremental detokenization (transformers' AutoTokenizer)."""
from __future__ import annotations

import re
from pathlib import Path


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template."""


class Tokenizer:
    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(directory)
        eos = self.hf.eos_token_id
        self.eos_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.has_chat_template = bool(self.hf.chat_template)
        self.has_tools = self.has_chat_template and _template_takes_tools(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """tools: OpenAI's tool definitions, for a template that takes them (has_tools)."""
        if not self.has_chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        try:
            return list(self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"])
        except Exception as e:  # jinja raises TemplateError and others for messages it cannot render
            raise ChatTemplateError(f"the chat template could not render these messages: {e}") from e

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def _template_takes_tools(hf) -> bool:
    """Whether the chat template (the one used with tools, where a tokenizer has several) reads `tools`."""
    import jinja2
    from jinja2 import meta

    source = hf.get_chat_template(tools=[])
    try:
        environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
        return "tools" in meta.find_undeclared_variables(environment.parse(source))
    except jinja2.TemplateError:  # a tag only transformers' environment knows ({% generation %}): read the text
        return re.search(r"\btools\b", source) is not None


class IncrementalDecoder:
    """Text of a growing token list, released only once it is stable (no half UTF-8 character).

    Decodes a short window, not the whole list, per token (as TGI and vLLM do): the text of
    ids[prefix:] minus the text of ids[prefix:read] is what the newest tokens added.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the text released so far
        self._prefix = self._read = 0

    def add(self, token_id: int) -> str:
        """Append a token; return the newly stable text (may be empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # nothing yet, or a half character
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
