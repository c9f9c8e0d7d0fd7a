"""FLOP counting and step timing for the benchmark (bench/train_bench.py).

FLOPs are counted, never measured: `count_flops` runs a function under PyTorch's
FlopCounterMode, which applies each matmul / convolution / attention op's analytic formula
(2*m*n*k for a matmul) to the shapes that actually ran, so a LoRA layer's frozen base counts
the matmul that carries the activation gradient and no weight-gradient matmul. The closed
forms `llm_flops` and `vit_flops` (2 * params * tokens forward; backward 2x for the frozen
base's activation gradients, 4x for LoRA's own weights; attention's two T x T matmuls) are a
cross-check of those counts.

`PhaseTimer` splits a step into phases with CUDA events (or the host clock on CPU): `mark(name)`
ends the running phase and starts `name`, so the phases tile the step and add up to its time.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

# NVIDIA H200 SXM dense bf16 peak (datasheet; the same Hopper die as the H100 SXM).
H200_BF16_PEAK_FLOPS = 989e12


# --------------------------------------------------------------------------- counting


def _attention_flops(query: Any, key: Any, value: Any) -> int:
    """QK^T and AV of (B, H, T, d) shapes; grouped-query keys/values (fewer heads) are fine."""
    batch, heads, q_len, q_dim = query
    k_len, v_dim = key[-2], value[-1]
    return 2 * batch * heads * q_len * k_len * q_dim + 2 * batch * heads * q_len * k_len * v_dim


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_flops(query, key, value)  # dQ, dK, dV and dP: twice the forward


def _attention_mapping() -> dict[Any, Any]:
    """PyTorch's own sdpa formulas assert equal head counts of q and k (torch 2.11), which
    grouped-query attention (Qwen2's enable_gqa) breaks; these count it correctly."""
    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}
    for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _sdpa_forward
        if hasattr(aten, name + "_backward"):
            mapping[getattr(aten, name + "_backward")] = _sdpa_backward
    return mapping


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int, dict[str, int]]:
    """Run fn() under FlopCounterMode: (its result, total FLOPs, FLOPs per module name).

    Per-module numbers are PyTorch's attribution, which is unreliable for backward ops: count
    a component by running it alone."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_attention_mapping())
    with counter:
        result = fn()
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return result, int(counter.get_total_flops()), per_module


def _attr(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def llm_linear_shapes(llm_cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one Qwen2/Llama-style decoder block."""
    hidden = int(_attr(llm_cfg, "hidden_size"))
    heads = int(_attr(llm_cfg, "num_attention_heads"))
    kv = int(_attr(llm_cfg, "num_key_value_heads", heads) or heads)
    head_dim = int(_attr(llm_cfg, "head_dim", None) or hidden // heads)
    inter = int(_attr(llm_cfg, "intermediate_size"))
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def llm_flops(llm_cfg: Any, tokens: int, lora_r: int = 0, lora_targets: tuple[str, ...] | list[str] = (),
              backward: bool = True, causal: bool = False) -> dict[str, float]:
    """Closed-form FLOPs of the LLM decoder (no vocabulary head) for one sequence of `tokens`.

    Forward: 2 * (base + LoRA linear params) * tokens + attention (QK^T and AV: 4 * T^2 * d per
    layer, halved when `causal`). Backward with a frozen base: 2 * base * T (activation gradients
    only), 4 * LoRA * T (activation and weight gradients), 2x the attention forward.
    """
    layers = int(_attr(llm_cfg, "num_hidden_layers"))
    shapes = llm_linear_shapes(llm_cfg)
    base = layers * sum(i * o for i, o in shapes.values())
    lora = layers * sum(lora_r * (i + o) for name, (i, o) in shapes.items() if name in set(lora_targets))
    attn_width = shapes["q_proj"][1]
    attention = layers * 4 * tokens * tokens * attn_width * (0.5 if causal else 1.0)
    forward = 2.0 * (base + lora) * tokens + attention
    out = {"base_params": float(base), "lora_params": float(lora), "forward": forward,
           "attention_forward": attention, "backward": 0.0}
    if backward:
        out["backward"] = 2.0 * base * tokens + 4.0 * lora * tokens + 2.0 * attention
    out["total"] = out["forward"] + out["backward"]
    return out


def vit_flops(vision_cfg: Any, tiles: int = 1, downsample: float = 0.5, llm_hidden: int | None = None) -> float:
    """Closed-form forward FLOPs of InternViT on `tiles` tiles (+ mlp1 when llm_hidden is given)."""
    hidden = int(_attr(vision_cfg, "hidden_size"))
    layers = int(_attr(vision_cfg, "num_hidden_layers"))
    inter = int(_attr(vision_cfg, "intermediate_size"))
    image = _attr(vision_cfg, "image_size")
    patch = _attr(vision_cfg, "patch_size")
    image = int(image[0] if isinstance(image, (list, tuple)) else image)
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    patches = (image // patch) ** 2
    tokens = patches + 1  # CLS
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inter) + 4 * tokens * tokens * hidden
    flops = layers * per_layer + 2 * patches * (3 * patch * patch) * hidden
    if llm_hidden is not None:
        width = int(hidden / (downsample * downsample))
        image_tokens = int(patches * downsample * downsample)
        flops += 2 * image_tokens * (width * llm_hidden + llm_hidden * llm_hidden)
    return float(flops * tiles)


def mfu(flops_per_sample: float, samples_per_s: float, peak: float = H200_BF16_PEAK_FLOPS) -> float:
    return flops_per_sample * samples_per_s / peak


# --------------------------------------------------------------------------- timing


class PhaseTimer:
    """Tile a step into named phases; read each phase's seconds after the step.

    On CUDA each mark records an event on the current stream, so a phase's time is the GPU
    timeline between two marks (idle gaps included): the phases add up to the step's wall
    time. On CPU the host clock is read (the work is synchronous there).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []
        self.paused = 0
        self.active = False  # between begin() and end(); marks elsewhere are ignored

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.active and not self.paused:
            self.marks.append((phase, self._now()))

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Marks inside are ignored (the running phase keeps the time)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def begin(self, phase: str = "other") -> None:
        self.marks = []
        self.active = True
        self.mark(phase)

    def end(self) -> dict[str, float]:
        """Close the step (synchronising on CUDA) and return seconds per phase, plus 'total'."""
        self.marks.append(("<end>", self._now()))
        self.active = False
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (name, start), (_, stop) in zip(self.marks, self.marks[1:]):
            seconds = start.elapsed_time(stop) / 1e3 if self.cuda else stop - start
            out[name] = out.get(name, 0.0) + seconds
        first, last = self.marks[0][1], self.marks[-1][1]
        out["total"] = first.elapsed_time(last) / 1e3 if self.cuda else last - first
        self.marks = []
        return out


def install_phase_hooks(timer: PhaseTimer, *, embedding: nn.Module, decoder: nn.Module,
                        vision: nn.Module | None = None, sam_encoder: nn.Module | None = None) -> list[Any]:
    """Module hooks that mark: vit (ViT starts), sam_enc (SAM2 image encoder starts),
    llm_fwd (the input embedding starts), heads_fwd (the decoder returns) and llm_bwd (the
    gradient reaches the decoder's output, so the heads' backward is done). Returns handles."""
    handles = []
    if vision is not None:
        handles.append(vision.register_forward_pre_hook(lambda m, a: timer.mark("vit")))
    if sam_encoder is not None:
        handles.append(sam_encoder.register_forward_pre_hook(lambda m, a: timer.mark("sam_enc")))
    handles.append(embedding.register_forward_pre_hook(lambda m, a: timer.mark("llm_fwd")))

    def after_decoder(module: nn.Module, args: Any, output: Any) -> None:
        timer.mark("heads_fwd")
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, (tuple, list)):
            hidden = output[0]
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad and timer.active and not timer.paused:
            hidden.register_hook(lambda grad: timer.mark("llm_bwd"))

    handles.append(decoder.register_forward_hook(after_decoder))
    return handles


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
