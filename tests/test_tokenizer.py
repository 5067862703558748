"""Incremental detokenization: streamed pieces add up to the whole text, never half a character."""
from app.engine.tokenizer import IncrementalDecoder


def test_streamed_text_equals_the_decoded_whole(tokenizer):
    text = "Grüße aus Köln! 東京は晴れ 🌤️ — naïve café, 3.14 ≈ π.\n  Indented line."
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids]
    assert "".join(pieces) == decoder.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_chat_template_ends_with_the_assistant_turn(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tokenizer.hf.decode(ids).endswith("<|im_start|>assistant\n")
