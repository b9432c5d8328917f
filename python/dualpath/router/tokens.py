"""Token ids of text and chat prompts, so that they get page keys and hit estimates like id prompts.

With ``--tokenizer-path`` (or ``--model-path``), as the stock router takes them, the router loads the served
model's tokenizer with ``transformers.AutoTokenizer`` (no torch) and turns prompts into the ids SGLang will
compute: ``/generate`` texts and ``/v1/completions`` prompts with ``tokenizer.encode`` (special tokens added, as
SGLang's tokenizer manager does), chat messages with ``apply_chat_template(..., add_generation_prompt=True)``
(``--chat-template`` replaces the tokenizer's own, as on an SGLang server) with the request's ``tools``,
``reasoning_effort`` and ``chat_template_kwargs``, then encoded as SGLang encodes it. The body sent to the
servers is the client's, unchanged. A prompt the tokenizer or the template cannot take (and, in this version,
chat content given as a list of parts) gets no estimate, as without a tokenizer; the request goes on.

The decision waits for the ids, so the router tokenizes only as far as they matter (``with_ids(..., probe)``):
the text between added tokens is cached, and a long piece the cache does not hold is encoded, in chunks cut where
encoding composes, only while the store holds every page before it. What lies past the hit is new text whose
ids would only refine its length: it counts as ``text_chars`` and is encoded in the background, so that the
next turn, which resends it, finds it cached. Encoding releases the GIL (``encode_batch``): a long prompt does
not stall the event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from dualpath.router.config import RouterConfig
from dualpath.router.protocol import ParsedRequest

log = logging.getLogger(__name__)


SEGMENT_CACHE_CHARS = 1 << 26  # text between added tokens: an agent's conversation is resent whole every turn
LAZY_CHARS = 256  # an uncached piece longer than this is encoded only as far as the store's hit reaches
FIRST_CHUNK_CHARS = 128  # chunks double from here: the first few show whether the hit goes on past the piece's start
BACKGROUND_CHARS = 1 << 24  # text waiting for background encoding; past this, new pieces wait for their next turn
_CUT = re.compile(r"(?<=[^\s]) (?=[^\W\d_])")  # a space between a non-space and a letter starts a pre-token

Reaches = Callable[[array], bool]  # whether the store holds every full page of these ids


class Probe(Protocol):
    """The store's view of one prompt whose ids grow (``dualpath.router.store_view.PrefixProbe``)."""

    def __call__(self, ids: array) -> bool: ...  # whether the store holds every full page of ``ids``

    def hit_tokens(self, ids: array) -> int: ...


class SegmentCache:
    """Ids of text pieces, least recently used first out, bounded by the characters held; thread-safe."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self._entries: OrderedDict[str, array] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str) -> array | None:
        with self._lock:
            ids = self._entries.get(text)
            if ids is not None:
                self._entries.move_to_end(text)
            return ids

    def put(self, text: str, ids: array) -> None:
        if len(text) > self.max_chars:
            return
        with self._lock:
            if self._entries.pop(text, None) is not None:
                self.chars -= len(text)
            self._entries[text] = ids
            self.chars += len(text)
            while self.chars > self.max_chars:
                self.chars -= len(self._entries.popitem(last=False)[0])


class PromptTokenizer:
    def __init__(self, path: str, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer  # seconds to import: only for a router given a tokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if chat_template is not None:  # a template file, or the template itself (as SGLang's --chat-template)
            template = Path(chat_template)
            self.tokenizer.chat_template = template.read_text() if template.is_file() else chat_template
        self._added = {token.content: token_id for token_id, token in self.tokenizer.added_tokens_decoder.items()}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self._added, key=len, reverse=True))) + ")")
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust one
        self.segments = SegmentCache(SEGMENT_CACHE_CHARS)
        self._prefix = self._suffix = array("I")  # what encode() adds around a text (Llama: <s> in front)
        self.cached = self._backend is not None and bool(self._added) and self._composes()
        self.chunked = self.cached and self._chunks_compose()
        self._background = ThreadPoolExecutor(1, thread_name_prefix="router-tokenize")
        self._queued: set[str] = set()
        self._queued_chars = 0
        self._queue_lock = threading.Lock()
        log.info("tokenizer of %s loaded: text and chat prompts get hit estimates (%s)", path,
                 "no cache: segments do not compose" if not self.cached else
                 "segments between added tokens cached" + (", long ones encoded as far as the store's hit"
                                                           if self.chunked else ""))

    @classmethod
    def of(cls, config: RouterConfig) -> PromptTokenizer | None:
        path = config.tokenizer_path or config.model_path
        return cls(path, config.chat_template) if path else None

    def with_ids(self, parsed: ParsedRequest, probe: Callable[[], Probe] | None = None) -> ParsedRequest:
        """``parsed`` with the token ids of its text or chat prompt (unchanged for id prompts or on failure).

        With ``probe`` (a new :class:`Probe` per prompt), each prompt's ids stop where the store's hit has ended
        (the characters left out count in ``text_chars``) and its hit comes with them (``hit_tokens``)."""
        if parsed.token_ids or not parsed.text_chars:
            return parsed
        try:
            texts = self._texts(parsed.route, parsed.body)
        except Exception as exc:  # a template's own errors are arbitrary; the request must not fail for them
            log.debug("no token ids for a %s prompt: %s: %s", parsed.route, type(exc).__name__, exc)
            return parsed
        prompts, left, hits = [], 0, []
        for text, add_special_tokens in texts:
            reaches = probe() if probe is not None else None
            ids, chars = self.encode_reaching(text, add_special_tokens, reaches)
            prompts.append(ids)
            left += chars
            if reaches is not None:
                hits.append(reaches.hit_tokens(ids))
        return dataclasses.replace(parsed, token_ids=tuple(prompts), text_chars=left, hit_tokens=tuple(hits))

    def encode(self, text: str, add_special_tokens: bool = True) -> array:
        """``tokenizer.encode`` as uint32; where the tokenizer allows it (``cached``), the text between added tokens
        is encoded once per distinct segment, so a conversation resent with a new turn costs only its new text."""
        return self.encode_reaching(text, add_special_tokens, None)[0]

    def encode_reaching(self, text: str, add_special_tokens: bool, reaches: Reaches | None) -> tuple[array, int]:
        """The leading ids of ``text`` that the hit estimate needs, and the characters left out (all the ids and 0
        without ``reaches``, or where the tokenizer cannot be chunked)."""
        if not self.cached:
            if self._backend is None:  # a slow (Python) tokenizer
                return array("I", self.tokenizer.encode(text, add_special_tokens=add_special_tokens)), 0
            return self._encode(text, add_special_tokens), 0
        ids = array("I", self._prefix if add_special_tokens else ())
        pieces = self._split.split(text)
        for index, piece in enumerate(pieces):
            if piece in self._added:
                ids.append(self._added[piece])
                continue
            known = self.segments.get(piece) if piece else array("I")
            if known is not None:
                ids.extend(known)
            elif reaches is None or not self.chunked or len(piece) <= LAZY_CHARS:
                ids.extend(self._segment(piece))
            else:
                done = self._encode_while(piece, ids, reaches)
                if done < len(piece):
                    self._encode_later(piece for piece in pieces[index:]
                                       if len(piece) > LAZY_CHARS and self.segments.get(piece) is None)
                    return ids, len(piece) - done + sum(map(len, pieces[index + 1:]))
        if add_special_tokens:
            ids.extend(self._suffix)
        return ids, 0

    def wait_background(self) -> None:
        """Return once the background encoding queued so far is done."""
        self._background.submit(int).result()

    def close(self) -> None:
        """Stop background encoding (what is queued is dropped)."""
        self._background.shutdown(wait=True, cancel_futures=True)

    def _encode_while(self, piece: str, ids: array, reaches: Reaches) -> int:
        """Extend ``ids`` with ``piece`` chunk by chunk while the store holds every page before the chunk; the
        characters of ``piece`` encoded (all of it: then it is cached)."""
        start = len(ids)
        done = 0
        for chunk in self._chunks(piece):
            if not reaches(ids):
                return done
            ids.extend(self._encode(chunk))
            done += len(chunk)
        self.segments.put(piece, ids[start:])
        return done

    @staticmethod
    def _chunks(piece: str) -> Iterator[str]:
        """``piece`` in chunks of doubling size, each cut where a pre-token starts (``_CUT``)."""
        start, size = 0, FIRST_CHUNK_CHARS
        while start < len(piece):
            cut = _CUT.search(piece, start + size) if start + size < len(piece) else None
            end = cut.start() if cut else len(piece)
            yield piece[start:end]
            start, size = end, size * 2

    def _segment(self, piece: str) -> array:
        ids = self.segments.get(piece)
        if ids is None:
            ids = self._encode(piece)
            self.segments.put(piece, ids)
        return ids

    def _encode(self, text: str, add_special_tokens: bool = False) -> array:
        # encode_batch releases the GIL, encode does not: a 30K-token prompt would stall the event loop 30 ms.
        return array("I", self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def _encode_later(self, pieces: Iterator[str]) -> None:
        for piece in pieces:
            with self._queue_lock:
                if piece in self._queued or self._queued_chars + len(piece) > BACKGROUND_CHARS:
                    continue
                self._queued.add(piece)
                self._queued_chars += len(piece)
            try:
                self._background.submit(self._encode_queued, piece)
            except RuntimeError:  # closed: the router is stopping
                return

    def _encode_queued(self, piece: str) -> None:
        try:
            self._segment(piece)
        finally:
            with self._queue_lock:
                self._queued.discard(piece)
                self._queued_chars -= len(piece)

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
                   == [*self._encode(a), token_id, *self._encode(b)] for token, token_id in self._added.items()
                   for a, b in samples)

    def _chunks_compose(self) -> bool:
        """Whether text cut at ``_CUT`` encodes as the whole: true where a pre-token never spans a space before a
        letter (the byte-level BPE regexes of GPT-2, Llama 3, Qwen, DeepSeek)."""
        samples = ["x=1; the cat, sat:\n  on a mat!  Ünïcödé wörds and 42 numbers\n\ttabbed lines end here.",
                   "def f(a, b):\n    return a + b  # comment with 'quotes' and ...dots\r\nnext line",
                   "a  b   c\u3000d 中文 text مرحبا world"]
        for sample in samples:
            cuts = [0, *(match.start() for match in _CUT.finditer(sample)), len(sample)]
            if [*self._encode(sample)] != [i for a, b in itertools.pairwise(cuts) for i in self._encode(sample[a:b])]:
                return False
        return True

    def _texts(self, route: str, body: dict[str, Any]) -> list[tuple[str, bool]]:
        """Each prompt's text and whether encoding it adds the tokenizer's special tokens."""
        if route == "chat":
            return [(self._render(body), not self._adds_specials)]
        prompt = body["text"] if route == "generate" else body["prompt"]
        return [(text, True) for text in ([prompt] if isinstance(prompt, str) else prompt)]

    def _render(self, body: dict[str, Any]) -> str:
        """As SGLang's OpenAI chat serving: render the template, to be encoded without adding the special tokens
        the template already wrote (when the tokenizer adds any)."""
        messages = body["messages"]
        if any(not isinstance(message.get("content"), str | None) for message in messages):
            raise ValueError("structured message content (lists of parts) is not tokenized by the router")
        messages = [{key: value for key, value in {**message, "content": message.get("content") or ""}.items()
                     if value is not None} for message in messages]
        kwargs = {"reasoning_effort": body["reasoning_effort"]} if body.get("reasoning_effort") is not None else {}
        kwargs.update(body.get("chat_template_kwargs") or {})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  tools=body.get("tools"), return_dict=False, **kwargs)

    @functools.cached_property
    def _adds_specials(self) -> bool:
        return len(self.tokenizer.encode("")) > 0
