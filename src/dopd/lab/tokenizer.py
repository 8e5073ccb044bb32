"""The lab's character-level tokenizer: one token per character, plus pad / eos / bos / unk.

A real `transformers.PreTrainedTokenizerFast` built with the `tokenizers` library, so that the lab's tiny models
take the same path as real checkpoints: it carries a small Jinja chat template (the user content, then a fixed
separator as the generation prompt), pads on the left for batched generation, and round-trips through
`save_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
# The separator between the user turn and the assistant's completion in the chat template.
ASSISTANT_SEPARATOR = "|"
# Every character a lab task may produce; anything else maps to <unk>.
CHARACTERS = string.digits + string.ascii_lowercase + "AQH" + "+-*=()[];:,.?_#>|/ \n"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_SEPARATOR + "{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer shared by the lab's teacher and student (ids are stable across calls)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in dict.fromkeys(CHARACTERS):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters (whitespace included) so that every character is one token.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
