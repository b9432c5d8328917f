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
from array import array
from pathlib import Path
from typing import Any

from dualpath.router.config import RouterConfig
from dualpath.router.protocol import ParsedRequest

log = logging.getLogger(__name__)


class PromptTokenizer:
    def __init__(self, path: str, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer  # only with a tokenizer: the router installs without it

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if chat_template is not None:  # a template file, or the template itself (as SGLang's --chat-template)
            template = Path(chat_template)
            self.tokenizer.chat_template = template.read_text() if template.is_file() else chat_template
        log.info("tokenizer of %s loaded: text and chat prompts get hit estimates", path)

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
        return dataclasses.replace(parsed, token_ids=tuple(array("I", item) for item in ids), text_chars=0)

    def _ids(self, route: str, body: dict[str, Any]) -> list[list[int]]:
        if route == "chat":
            return [self._chat_ids(body)]
        prompt = body["text"] if route == "generate" else body["prompt"]
        texts = [prompt] if isinstance(prompt, str) else prompt
        return [self.tokenizer.encode(text) for text in texts]

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
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
        return self.tokenizer.encode(rendered, **({"add_special_tokens": False} if self._adds_specials else {}))

    @functools.cached_property
    def _adds_specials(self) -> bool:
        return len(self.tokenizer.encode("")) > 0
