"""The router's tokenizer: segment-cached encoding equals the tokenizer's own, for any text, and the cache is
off where segments do not compose (SentencePiece-style Metaspace)."""

from __future__ import annotations

from pathlib import Path

from dualpath.router.tokens import PromptTokenizer
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
