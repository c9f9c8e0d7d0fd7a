"""The InternLM2 family (Sa2VA-8B/26B) of the tiny checkpoint: LLM config, tokenizer files.

`python -m sa2va.tiny --out DIR --family internlm2` writes a folder laid out like Sa2VA-8B/26B:
the LLM is our InternLM2 remote code (sa2va/remote_code/modeling_internlm2.py) and the tokenizer
is a sentencepiece `tokenizer.model` trained here (sentencepiece's own trainer, one thread, so the
same bytes every time) read by the slow `InternLM2Tokenizer`, with the fast class named beside it
in tokenizer_config.json, as in the release. Like InternLM2's, the sentencepiece model ends with
six placeholders `[UNUSED_TOKEN_141..146]` that tokenizer_config.json renames to the chat tokens;
the Sa2VA tokens (`<img>` ... `[SEG]` ... `</vp>`) are added after them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from .errors import UserError

REMOTE_CODE_FILES = ("tokenization_internlm2.py", "tokenization_internlm2_fast.py")
SP_TRAINED_PIECES = 600  # sentencepiece's own vocabulary (3 control + 256 bytes + merges)
# The six placeholders at the end of InternLM2's tokenizer.model and the chat tokens they become.
RENAMED = {
    "[UNUSED_TOKEN_141]": "<|plugin|>",
    "[UNUSED_TOKEN_142]": "<|interpreter|>",
    "[UNUSED_TOKEN_143]": "<|action_end|>",
    "[UNUSED_TOKEN_144]": "<|action_start|>",
    "[UNUSED_TOKEN_145]": "<|im_end|>",
    "[UNUSED_TOKEN_146]": "<|im_start|>",
}
# Added by InternVL, then by Sa2VA, in this order after the sentencepiece vocabulary.
ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                "[SEG]", "<p>", "</p>", "<vp>", "</vp>"]


def internlm2_llm(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int,
                  max_pos: int = 32768, rope_theta: float = 1000000.0, rope_scaling: dict | None = None) -> dict:
    """An llm_config dict as Sa2VA-8B/26B carry it (InternLM2's field names)."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "bias": False,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
        "initializer_range": 0.02,
        "pad_token_id": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _train_sentencepiece(lines: list[str]) -> bytes:
    """A BPE sentencepiece model with byte fallback, then the six placeholders appended."""
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise UserError(f"the internlm2 family needs sentencepiece ({err}): pip install -r requirements.txt") from err

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=SP_TRAINED_PIECES,
        byte_fallback=True, character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for name in RENAMED:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = name, 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_tokenizer(folder: Path, corpus_lines: list[str]) -> dict[str, int]:
    """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json; return token -> id
    for every special and added token."""
    model = _train_sentencepiece(corpus_lines)
    (folder / "tokenizer.model").write_bytes(model)
    pieces = SP_TRAINED_PIECES + len(RENAMED)
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids.update({chat: SP_TRAINED_PIECES + i for i, chat in enumerate(RENAMED.values())})
    ids.update({tok: pieces + i for i, tok in enumerate(ADDED_TOKENS)})
    special = list(RENAMED.values())[::-1] + ADDED_TOKENS
    config = {
        "added_tokens_decoder": {str(i): _token_entry(t) for t, i in sorted(ids.items(), key=lambda kv: kv[1])},
        "additional_special_tokens": special,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 32768,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {"additional_special_tokens": special, "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")
    return ids


def load_slow_tokenizer(folder: Path):
    """Our InternLM2Tokenizer on a folder being written (the warm-up needs the release's ids)."""
    from .remote_code.tokenization_internlm2 import InternLM2Tokenizer

    return InternLM2Tokenizer.from_pretrained(str(folder))
