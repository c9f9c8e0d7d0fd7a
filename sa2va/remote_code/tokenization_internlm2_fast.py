"""InternLM2 tokenizer (fast) of the sa2va-dpo tiny checkpoint (remote code).

Shaped like the `InternLM2TokenizerFast` that Sa2VA-8B/26B name next to the slow class in
`tokenizer_config.json`: there is no tokenizer.json, so the fast tokenizer is converted from
the sentencepiece `tokenizer.model`. transformers 5.x picks this class even when asked for
`use_fast=False`; its conversion does not reproduce the slow class's ids (the renamed
placeholders are appended again as new tokens), which is why the suite's loader builds the
slow `InternLM2Tokenizer` explicitly (sa2va/compat.py).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS, SpmConverter

from .tokenization_internlm2 import InternLM2Tokenizer


class InternLM2Converter(SpmConverter):
    handle_byte_fallback = True


SLOW_TO_FAST_CONVERTERS["InternLM2Tokenizer"] = InternLM2Converter


class InternLM2TokenizerFast(PreTrainedTokenizerFast):
    vocab_files_names = {"vocab_file": "./tokenizer.model"}
    slow_tokenizer_class = InternLM2Tokenizer
    padding_side = "left"
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab_file=None,
        tokenizer_file=None,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        super().__init__(
            vocab_file=vocab_file,
            tokenizer_file=tokenizer_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.vocab_file = vocab_file
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
