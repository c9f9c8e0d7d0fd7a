"""InternLM2 LLM of the sa2va-dpo tiny checkpoint (remote code, self-contained).

Written to have the public surface *and the quirks* of the InternLM2 remote code that Sa2VA-8B/26B
ship, so that the suite's loader meets here what it meets in a real checkpoint:
- weights: `model.tok_embeddings`, `model.layers.N.attention.wqkv` (fused, laid out per key-value
  group: the group's query heads, then its key head, then its value head), `attention.wo`,
  `feed_forward.w1` (gate) / `w3` (up) / `w2` (down), `attention_norm`, `ffn_norm`, `model.norm`,
  `output`;
- `_init_rope` reads `config.rope_scaling['type']` (KeyError on transformers 5.x without repair);
- the rotary embedding keeps `inv_freq`, `cos_cached`, `sin_cached` as non-persistent buffers (left
  uninitialised by transformers 5.x loading);
- the KV cache is the legacy tuple of (key, value) per layer;
- `InternLM2ForCausalLM` does not inherit `GenerationMixin` (no `generate` on transformers >= 4.50).
Eager attention only; the code imports torch and transformers, nothing else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class InternLM2RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_position_embeddings-1, grown on demand."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._set_cos_sin_cache(max_position_embeddings, self.inv_freq.device, torch.get_default_dtype())

    def _positions(self, seq_len, device):
        return torch.arange(seq_len, device=device).to(self.inv_freq.dtype)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        freqs = torch.outer(self._positions(seq_len, device), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len, x.device, torch.float32)
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)


class InternLM2LinearScalingRotaryEmbedding(InternLM2RotaryEmbedding):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None, scaling_factor=1.0):
        self.scaling_factor = scaling_factor
        super().__init__(dim, max_position_embeddings, base, device)

    def _positions(self, seq_len, device):
        return super()._positions(seq_len, device) / self.scaling_factor


class InternLM2DynamicNTKScalingRotaryEmbedding(InternLM2RotaryEmbedding):
    """Past max_position_embeddings the base grows with the length (NTK-aware scaling)."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None, scaling_factor=1.0):
        self.scaling_factor = scaling_factor
        super().__init__(dim, max_position_embeddings, base, device)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        if seq_len > self.max_position_embeddings:
            grown = (self.scaling_factor * seq_len / self.max_position_embeddings) - (self.scaling_factor - 1)
            base = self.base * grown ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        super()._set_cos_sin_cache(seq_len, device, dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids):
    cos = cos[position_ids].unsqueeze(1)
    sin = sin[position_ids].unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.max_position_embeddings = config.max_position_embeddings
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        self.wqkv = nn.Linear(self.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=config.bias)
        self._init_rope()

    def _init_rope(self):
        common = dict(max_position_embeddings=self.max_position_embeddings, base=self.config.rope_theta)
        if self.config.rope_scaling is None:
            self.rotary_emb = InternLM2RotaryEmbedding(self.head_dim, **common)
            return self.rotary_emb
        kind = self.config.rope_scaling["type"]  # as the release reads it
        factor = self.config.rope_scaling["factor"]
        if kind == "dynamic":
            self.rotary_emb = InternLM2DynamicNTKScalingRotaryEmbedding(self.head_dim, scaling_factor=factor, **common)
        elif kind == "linear":
            self.rotary_emb = InternLM2LinearScalingRotaryEmbedding(self.head_dim, scaling_factor=factor, **common)
        else:
            raise ValueError("rope_scaling type must be 'dynamic' or 'linear'")
        return self.rotary_emb

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        bsz, q_len, _ = hidden_states.shape
        groups = self.num_key_value_groups
        # (b, q, kv_heads, groups + 2, head_dim): per kv group its query heads, its key, its value
        qkv = self.wqkv(hidden_states).view(bsz, q_len, self.num_key_value_heads, groups + 2, self.head_dim)
        query = qkv[..., :groups, :].reshape(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)

        kv_seq_len = key.shape[-2] + (past_key_value[0].shape[-2] if past_key_value is not None else 0)
        cos, sin = self.rotary_emb(value, seq_len=kv_seq_len)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, position_ids)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value) if use_cache else None

        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim)
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, value).transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return self.wo(out), (weights if output_attentions else None), present


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        attn, weights, present = self.attention(self.attention_norm(hidden_states), attention_mask=attention_mask,
                                                position_ids=position_ids, past_key_value=past_key_value,
                                                output_attentions=output_attentions, use_cache=use_cache)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, InternLM2RMSNorm):
            nn.init.ones_(module.weight)


def _additive_mask(attention_mask, bsz, q_len, past_len, dtype, device):
    """(bsz, 1, q_len, past_len + q_len): 0 where a query may look, dtype-min elsewhere."""
    total = past_len + q_len
    allowed = torch.ones(q_len, total, dtype=torch.bool, device=device).tril(diagonal=past_len)
    allowed = allowed[None, None].expand(bsz, 1, q_len, total)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class InternLM2Model(InternLM2PreTrainedModel):
    _auto_class = "AutoModel"

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        bsz, seq_len = inputs_embeds.shape[:2]
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)[None]
        mask = _additive_mask(attention_mask, bsz, seq_len, past_len, inputs_embeds.dtype, inputs_embeds.device)
        if self.gradient_checkpointing and self.training:
            use_cache = False

        hidden_states = inputs_embeds
        all_hidden, all_attn = (() if output_hidden_states else None), (() if output_attentions else None)
        next_cache = () if use_cache else None
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden_states,)
            past = past_key_values[idx] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training:
                outputs = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, mask, position_ids, None, output_attentions, False, use_reentrant=False)
            else:
                outputs = layer(hidden_states, attention_mask=mask, position_ids=position_ids, past_key_value=past,
                                output_attentions=output_attentions, use_cache=use_cache)
            hidden_states = outputs[0]
            if use_cache:
                next_cache += (outputs[2 if output_attentions else 1],)
            if output_attentions:
                all_attn += (outputs[1],)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, next_cache, all_hidden, all_attn) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=next_cache,
                                       hidden_states=all_hidden, attentions=all_attn)


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    """Like the release: a PreTrainedModel with `prepare_inputs_for_generation` but no GenerationMixin."""

    _auto_class = "AutoModelForCausalLM"
    _tied_weights_keys = ["output.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, new_embeddings):
        self.output = new_embeddings

    def set_decoder(self, decoder):
        self.model = decoder

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=True)
        logits = self.output(outputs.last_hidden_state).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if not return_dict:
            rest = tuple(v for v in (outputs.past_key_values, outputs.hidden_states, outputs.attentions)
                         if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        """The release's legacy-cache rule: feed only what the tuple cache has not seen."""
        if past_key_values is not None:
            past_length = past_key_values[0][0].shape[2]
            keep_from = past_length if input_ids.shape[1] > past_length else input_ids.shape[1] - 1
            input_ids = input_ids[:, keep_from:]
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -input_ids.shape[1]:]
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update({"position_ids": position_ids, "past_key_values": past_key_values,
                             "use_cache": kwargs.get("use_cache"), "attention_mask": attention_mask})
        return model_inputs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)
