"""InternLM2 configuration of the sa2va-dpo tiny checkpoint (remote code, self-contained).

Shaped like the InternLM2 remote code that Sa2VA-8B/26B ship: the same field names
(`bias`, `rope_theta`, `rope_scaling` as {"type", "factor"}, `attn_implementation`) and the same
validation, written for transformers 4.x. On transformers 5.x a `rope_scaling` of None comes
back as a dict with `rope_type` and no `type`; the modeling file reads `['type']` like the
release does, so the suite's loader has to repair it (sa2va/compat.py), as for a real checkpoint.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"
    _auto_class = "AutoConfig"

    def __init__(
        self,
        vocab_size=103168,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        bias=True,
        rope_theta=10000,
        rope_scaling=None,
        attn_implementation="eager",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.bias = bias
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._check_rope_scaling()
        self.attn_implementation = attn_implementation or "eager"
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_rope_scaling(self):
        """None, or exactly {"type": "linear"|"dynamic", "factor": >= 1} (the release's rule)."""
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or len(scaling) != 2:
            raise ValueError(f"`rope_scaling` must be a dict with two fields, `type` and `factor`, got {scaling}")
        kind, factor = scaling.get("type"), scaling.get("factor")
        if kind not in ("linear", "dynamic"):
            raise ValueError(f"`rope_scaling`'s type must be 'linear' or 'dynamic', got {kind}")
        if not isinstance(factor, (int, float)) or factor < 1.0:
            raise ValueError(f"`rope_scaling`'s factor must be a number >= 1, got {factor}")
