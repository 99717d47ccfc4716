"""Incremental detokenization: turn each new token into new text, and cut at stop strings."""

from __future__ import annotations

from pjllm.engine.sequence import Sequence

# Tokens of context decoded before the new ones, so that a word's leading space and characters
# split across tokens come out as the full-text decode would give them.
_CONTEXT_TOKENS = 5


def start_detokenizer(seq: Sequence) -> None:
    seq.read_offset = seq.num_prompt_tokens
    seq.prefix_offset = max(seq.num_prompt_tokens - _CONTEXT_TOKENS, 0)


def decode_new_text(tokenizer, seq: Sequence) -> str:
    """Appends to `seq.text` the text its newest tokens complete; returns that new text.

    Text is held back while the tokens decode to an incomplete character (U+FFFD).
    """
    skip = seq.params.skip_special_tokens
    resolved = seq.num_resolved_tokens
    prefix_text = tokenizer.decode(seq.token_ids[seq.prefix_offset:seq.read_offset],
                                   skip_special_tokens=skip)
    full_text = tokenizer.decode(seq.token_ids[seq.prefix_offset:resolved], skip_special_tokens=skip)
    if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
        return ""
    new_text = full_text[len(prefix_text):]
    seq.prefix_offset = seq.read_offset
    seq.read_offset = resolved
    seq.text += new_text
    return new_text


class TokenTexts:
    """Each token's text on its own (a logprob's `decoded_token`), decoded once per token id:
    a step with logprobs asks for thousands, mostly the same few."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._tokenizer.decode([token])
        return text


def find_stop_string(seq: Sequence, new_text_len: int) -> str | None:
    """Checks the text that just arrived for a stop string; truncates `seq.text` at the match.
    Stop strings count only once `min_tokens` tokens are out."""
    if seq.num_resolved_tokens - seq.num_prompt_tokens < seq.params.min_tokens:
        return None
    for stop in seq.params.stop:
        # A match may start up to len(stop) - 1 characters before the new text.
        search_from = max(len(seq.text) - new_text_len - len(stop) + 1, 0)
        index = seq.text.find(stop, search_from)
        if index != -1:
            end = index + len(stop) if seq.params.include_stop_str_in_output else index
            seq.text = seq.text[:end]
            return stop
    return None
