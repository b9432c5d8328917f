"""The router's tokenizer: segment-cached and chunked encoding equals the tokenizer's own, for any text, and the
cache is off where segments do not compose (SentencePiece-style Metaspace); a long piece is encoded only as far as
the store's hit reaches, the rest in the background; encoding lets other threads (the event loop) run."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest
from dualpath.kv import block_keys
from dualpath.router import tokens
from dualpath.router.protocol import parse_request
from dualpath.router.store_view import PrefixProbe, StoreView
from dualpath.router.tokens import PromptTokenizer, SegmentCache
from dualpath.store import BlockStore, StoreConfig
from hypothesis import given, settings
from hypothesis import strategies as st

TINY = Path(__file__).parent / "data" / "tiny_tokenizer"
TOKENIZER = PromptTokenizer(str(TINY))
pieces = st.one_of(st.sampled_from(["<s>", "</s>", "<unk>", " ", "\n", "the agent", " reads", "x=1;", "ü"]),
                   st.text(max_size=12))


@settings(max_examples=200, deadline=None)
@given(st.lists(pieces, max_size=30), st.booleans())
def test_segment_cached_encoding_equals_the_tokenizers(parts: list[str], specials: bool) -> None:
    text = "".join(parts)
    assert TOKENIZER.cached
    assert list(TOKENIZER.encode(text, specials)) == TOKENIZER.tokenizer.encode(text, add_special_tokens=specials)
    assert list(TOKENIZER.encode(text, specials)) == TOKENIZER.tokenizer.encode(text, add_special_tokens=specials)


def test_a_tokenizer_whose_segments_do_not_compose_is_not_cached(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # Llama 2's: a space before the first
    spm.train_from_iterator(["the agent reads a file"] * 50, trainers.BpeTrainer(
        vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    tokenizer = PromptTokenizer(str(tmp_path))
    assert not tokenizer.cached
    text = "the agent</s>reads a file"
    assert list(tokenizer.encode(text, False)) == tokenizer.tokenizer.encode(text, add_special_tokens=False)


WORDS = ("the", "agent", "reads", "a", "file,", "and", "edits", "code:", "x=1;", "then\n", "runs", "tests", "ünïcödé",
         "42", "  until", "every\ttest", "passes.")


def prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@settings(max_examples=100, deadline=None)
@given(st.lists(pieces, max_size=40), st.integers(1, 64))
def test_chunked_encoding_equals_the_tokenizers(parts: list[str], first_chunk: int) -> None:
    text = "".join(parts) * 3
    TOKENIZER.segments = SegmentCache(tokens.SEGMENT_CACHE_CHARS)  # every long piece goes through the chunks
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokens, "LAZY_CHARS", 4)
        patch.setattr(tokens, "FIRST_CHUNK_CHARS", first_chunk)
        ids, left = TOKENIZER.encode_reaching(text, True, lambda ids: True)
    assert TOKENIZER.chunked and left == 0
    assert list(ids) == TOKENIZER.tokenizer.encode(text, add_special_tokens=True)


class Store:
    """A real store directory whose index holds the pages the test publishes; the router's view of it."""

    def __init__(self, root: Path) -> None:
        self.writer = BlockStore(StoreConfig(root, "tiny", 64, node="writer", io_threads=1))
        self.view = StoreView(root)

    def publish(self, ids: array) -> None:
        for key in block_keys(ids, 64):
            path = self.writer.path(key)
            path.parent.mkdir(exist_ok=True)
            path.touch()

    def probe(self) -> PrefixProbe:
        return self.view.probe(self.writer.config.namespace, 64)


def test_a_long_new_piece_is_encoded_as_far_as_the_hit_then_in_the_background(tmp_path: Path) -> None:
    tokenizer = PromptTokenizer(str(TINY))
    rng = random.Random(5)
    shared, new = prose(rng, 600), prose(rng, 3000)  # a stored system prompt, then a first turn's new context
    body = {"messages": [{"role": "system", "content": shared}, {"role": "user", "content": new}]}
    parsed = parse_request("chat", json.dumps(body).encode(), set())
    exact = tokenizer.with_ids(parsed).token_ids[0]
    system = tokenizer.with_ids(parse_request("chat", json.dumps({"messages": body["messages"][:1]}).encode(),
                                              set())).token_ids[0]
    common = next(i for i, (a, b) in enumerate(zip(system, exact, strict=False)) if a != b)
    tokenizer.segments = SegmentCache(tokens.SEGMENT_CACHE_CHARS)
    tokenizer.encode(shared, False)  # the router has seen the system prompt before, not the new context
    store = Store(tmp_path)
    store.publish(exact[:common + 100])  # ... and the store holds it and a page or so past it
    encoded: list[int] = []  # characters encoded on the caller's thread (not the background's)
    tokenizer._encode = lambda text, encode=tokenizer._encode: (
        threading.current_thread() is threading.main_thread() and encoded.append(len(text))) or encode(text)
    tokenizer.wait_background()

    lazy = tokenizer.with_ids(parsed, store.probe)
    ids = lazy.token_ids[0]
    assert list(ids) == list(exact[:len(ids)]) and lazy.text_chars > 0  # an exact prefix, and the rest left out
    assert lazy.hit_tokens == ((common + 100) // 64 * 64,)  # every stored page is found ...
    assert sum(encoded) < len(new) // 4  # ... without encoding the new context first
    tokenizer.wait_background()  # the background encodes it for the next turn
    encoded.clear()
    again = tokenizer.with_ids(parsed, store.probe)
    assert again.token_ids == (exact,) and again.text_chars == 0 and again.hit_tokens == lazy.hit_tokens
    assert sum(encoded) < 100
    # A store that holds every page of the prompt is followed to its end, chunk by chunk.
    store.publish(exact)
    tokenizer.segments = SegmentCache(tokens.SEGMENT_CACHE_CHARS)
    full = tokenizer.with_ids(parsed, store.probe)
    assert full.token_ids == (exact,) and full.text_chars == 0 and full.hit_tokens == (len(exact) // 64 * 64,)
    tokenizer.close()
    store.writer.close()


def test_nothing_past_a_miss_is_encoded_before_the_decision() -> None:
    tokenizer = PromptTokenizer(str(TINY))
    text = prose(random.Random(6), 2000)
    ids, left = tokenizer.encode_reaching(text, True, lambda ids: False)
    assert list(ids) == [tokenizer.tokenizer.bos_token_id] and left == len(text)
    tokenizer.close()  # the piece being encoded is finished, the queue dropped; nothing is queued after
    later = prose(random.Random(8), 2000)
    assert tokenizer.encode_reaching(later, True, lambda ids: False)[1] == len(later)
    assert tokenizer.segments.get(later) is None


def test_the_segment_cache_is_bounded_by_characters() -> None:
    cache = SegmentCache(10)
    cache.put("abcd", array("I", [1]))
    cache.put("efgh", array("I", [2]))
    assert cache.get("abcd") == array("I", [1])  # now the most recently used
    cache.put("ijkl", array("I", [3]))
    assert cache.get("efgh") is None and cache.chars == 8 and len(cache) == 2
    cache.put("x" * 11, array("I", [4]))  # longer than the whole cache: not kept
    assert cache.get("x" * 11) is None and cache.chars == 8


def progress_of_another_thread_during(encode: Callable[[], object]) -> int:
    """How many steps another thread made while ``encode`` ran (it can step only while ``encode`` lets go of
    the GIL: the switch interval is longer than the whole test)."""
    steps = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            steps[0] += 1
            time.sleep(0)  # gives the GIL back at once

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100)
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        before = steps[0]
        encode()
        return steps[0] - before
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


def test_encoding_a_long_prompt_lets_the_event_loop_run() -> None:
    text = prose(random.Random(7), 20_000)
    assert progress_of_another_thread_during(lambda: TOKENIZER._encode(text)) > 0
    # Negative control: the tokenizer's own encode holds the GIL throughout (the reason the router does not use it).
    assert progress_of_another_thread_during(lambda: TOKENIZER.tokenizer.backend_tokenizer.encode(text)) == 0
