"""Token ids of text and chat prompts, so that they get page keys and hit estimates like id prompts.

With ``--tokenizer-path`` (or ``--model-path``), as the stock router takes them, the router loads the served
model's tokenizer with ``transformers.AutoTokenizer`` (no torch) and turns prompts into the ids SGLang will
compute: ``/generate`` texts and ``/v1/completions`` prompts with ``tokenizer.encode`` (special tokens added, as
SGLang's tokenizer manager does), chat messages with ``apply_chat_template(..., add_generation_prompt=True)``
(``--chat-template`` replaces the tokenizer's own, as on an SGLang server) with the request's ``tools``,
``reasoning_effort`` and ``chat_template_kwargs``, then encoded as SGLang encodes it. The body sent to the
servers is the client's, unchanged. A prompt the tokenizer or the template cannot take (and, in this version,
chat content given as a list of parts) gets no estimate, as without a tokenizer; the request goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from array import array
from pathlib import Path
from typing import Any

from dualpath.router.config import RouterConfig
from dualpath.router.protocol import ParsedRequest

log = logging.getLogger(__name__)


SEGMENT_CACHE = 1 << 16  # text between added tokens: an agent's conversation is resent whole every turn


class PromptTokenizer:
    def __init__(self, path: str, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer  # seconds to import: only for a router given a tokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if chat_template is not None:  # a template file, or the template itself (as SGLang's --chat-template)
            template = Path(chat_template)
            self.tokenizer.chat_template = template.read_text() if template.is_file() else chat_template
        self._added = {token.content: token_id for token_id, token in self.tokenizer.added_tokens_decoder.items()}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self._added, key=len, reverse=True))) + ")")
        backend = getattr(self.tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust one
        self._segment = functools.lru_cache(SEGMENT_CACHE)(
            lambda text: array("I", backend.encode(text, add_special_tokens=False).ids))
        self._prefix = self._suffix = array("I")  # what encode() adds around a text (Llama: <s> in front)
        self.cached = backend is not None and bool(self._added) and self._composes()
        log.info("tokenizer of %s loaded: text and chat prompts get hit estimates (%s)", path,
                 "segments between added tokens cached" if self.cached else "no cache: segments do not compose")

    @classmethod
    def of(cls, config: RouterConfig) -> PromptTokenizer | None:
        path = config.tokenizer_path or config.model_path
        return cls(path, config.chat_template) if path else None

    def with_ids(self, parsed: ParsedRequest) -> ParsedRequest:
        """``parsed`` with the token ids of its text or chat prompt (unchanged for id prompts or on failure)."""
        if parsed.token_ids or not parsed.text_chars:
            return parsed
        try:
            ids = self._ids(parsed.route, parsed.body)
        except Exception as exc:  # a template's own errors are arbitrary; the request must not fail for them
            log.debug("no token ids for a %s prompt: %s: %s", parsed.route, type(exc).__name__, exc)
            return parsed
        return dataclasses.replace(parsed, token_ids=tuple(ids), text_chars=0)

    def encode(self, text: str, add_special_tokens: bool = True) -> array:
        """``tokenizer.encode`` as uint32; where the tokenizer allows it (``cached``), the text between added tokens
        is encoded once per distinct segment, so a conversation resent with a new turn costs only its new text."""
        if not self.cached:
            return array("I", self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        ids = array("I", self._prefix if add_special_tokens else ())
        for piece in self._split.split(text):
            if piece in self._added:
                ids.append(self._added[piece])
            elif piece:
                ids.extend(self._segment(piece))
        if add_special_tokens:
            ids.extend(self._suffix)
        return ids

    def _composes(self) -> bool:
        """Whether encoding segment by segment gives what encoding the whole text gives: true for byte-level BPE
        (Llama 3, Qwen, DeepSeek), false where a segment's first piece is treated apart (SentencePiece's
        Metaspace adds a space to the first one only)."""
        encode = self.tokenizer.encode
        bare = encode("x y", add_special_tokens=False)
        full = encode("x y", add_special_tokens=True)
        start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
        if start is None:
            return False
        self._prefix, self._suffix = array("I", full[:start]), array("I", full[start + len(bare):])
        samples = [("the cat sat\n", " with a space"), ("tab\tand\nlines ", "ünïcödé 42 x=1;"), ("", "\n")]
        return all(encode(a + token + b, add_special_tokens=False)
                   == [*self._segment(a), token_id, *self._segment(b)] for token, token_id in self._added.items()
                   for a, b in samples)

    def _ids(self, route: str, body: dict[str, Any]) -> list[array]:
        if route == "chat":
            return [self._chat_ids(body)]
        prompt = body["text"] if route == "generate" else body["prompt"]
        texts = [prompt] if isinstance(prompt, str) else prompt
        return [self.encode(text) for text in texts]

    def _chat_ids(self, body: dict[str, Any]) -> array:
        """As SGLang's OpenAI chat serving: render the template, then encode without adding the special tokens the
        template already wrote (when the tokenizer adds any)."""
        messages = body["messages"]
        if any(not isinstance(message.get("content"), str | None) for message in messages):
            raise ValueError("structured message content (lists of parts) is not tokenized by the router")
        messages = [{key: value for key, value in {**message, "content": message.get("content") or ""}.items()
                     if value is not None} for message in messages]
        kwargs = {"reasoning_effort": body["reasoning_effort"]} if body.get("reasoning_effort") is not None else {}
        kwargs.update(body.get("chat_template_kwargs") or {})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      tools=body.get("tools"), return_dict=False, **kwargs)
        return self.encode(rendered, add_special_tokens=not self._adds_specials)

    @functools.cached_property
    def _adds_specials(self) -> bool:
        return len(self.tokenizer.encode("")) > 0
