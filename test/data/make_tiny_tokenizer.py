"""Builds test/data/tiny_tokenizer (run once, offline; the files are committed): a byte-level BPE tokenizer of
512 tokens with Llama's special tokens (<unk> 0, <s> 1, </s> 2; <s> added in front of every encoded text, as
Llama's tokenizer does) and a chat template, for the tiny Llama (vocabulary 32000) served with a tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TARGET = Path(__file__).parent / "tiny_tokenizer"
WORDS = ["the", "agent", "reads", "a", "file", "and", "edits", "the", "code", "then", "runs", "the", "tests", "and",
         "reads", "the", "output", "again", "until", "every", "test", "passes", "while", "the", "cache", "keeps",
         "the", "context", "of", "each", "turn", "on", "the", "storage", "nodes"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def main() -> None:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<unk>", chat_template=CHAT_TEMPLATE)
    wrapped.save_pretrained(TARGET)


if __name__ == "__main__":
    main()
