"""The GPU benchmark's code paths on the tiny preset, on CPU (no timing assertions).

The numbers of docs/performance.md come from bench/train_bench.py on an H200; this checks that
every path it times runs here: the weightless build, the caches, FLOP counting, the naive and
optimised training steps, the evaluation paths and their agreement, and the summary.
"""

import importlib.util
import json
import sys

import pytest
import torch
from conftest import REPO

from sa2va import perf


def _bench_module():
    spec = importlib.util.spec_from_file_location("train_bench", REPO / "bench" / "train_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_closed_form_llm_flops_match_the_counted_linear_flops():
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32)
    torch.manual_seed(0)
    model = Qwen2Model(cfg).eval()
    tokens = 12
    x = torch.randn(2, tokens, 64)
    with torch.no_grad():
        _, counted, _ = perf.count_flops(lambda: model(inputs_embeds=x, use_cache=False))
    closed = perf.llm_flops(cfg, tokens, backward=False)  # attention counted in full, as the counter does
    assert counted == pytest.approx(2 * closed["forward"])
    lora = perf.llm_flops(cfg, tokens, lora_r=4, lora_targets=["q_proj", "v_proj"])
    assert lora["lora_params"] == 2 * 4 * ((64 + 64) + (64 + 32))
    assert lora["backward"] == pytest.approx(2 * lora["base_params"] * tokens + 4 * lora["lora_params"] * tokens
                                             + 2 * lora["attention_forward"])


def test_phase_timer_tiles_the_step():
    timer = perf.PhaseTimer(torch.device("cpu"))
    timer.mark("ignored")  # outside a step
    timer.begin("a")
    sum(range(10000))
    timer.mark("b")
    with timer.pause():
        timer.mark("c")
    timer.mark("a")
    out = timer.end()
    assert set(out) == {"a", "b", "total"}
    assert out["a"] + out["b"] == pytest.approx(out["total"])


def test_bench_runs_end_to_end_on_the_tiny_preset(tmp_path):
    bench = _bench_module()
    out = tmp_path / "results.json"
    code = bench.main(["--device", "cpu", "--plan", "tiny=eval,naive,opt", "--steps", "1", "--warmup", "0",
                       "--micro-batch", "2", "--grad-accum", "1", "--images", "2", "--image-size", "128",
                       "--eval-images", "2", "--eval-generate", "1", "--eval-batch", "2",
                       "--workdir", str(tmp_path), "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    tiny = results["tiny"]
    flops = tiny["flops"]
    assert flops["train_fwd_bwd"] > flops["llm_fwd_bwd"] > 0
    assert flops["vit_fwd"] > 0 and flops["sam_encoder_fwd"] > 0 and flops["reference_fwd"] > 0
    for name in ("naive", "opt"):
        r = tiny["variants"][name]
        assert r["samples_per_s_per_gpu"] > 0 and r["mfu_useful"] > 0
        phases = r["phase_s_per_step"]
        assert sum(phases.values()) == pytest.approx(r["step_s"], rel=1e-6)
    naive, opt = tiny["variants"]["naive"], tiny["variants"]["opt"]
    assert {"vit", "sam_enc", "reference"} <= set(naive["phase_s_per_step"])  # recomputed every step
    assert not {"vit", "sam_enc", "reference"} & set(opt["phase_s_per_step"])  # cached
    assert naive["mfu_executed"] > naive["mfu_useful"]
    ev = tiny["eval"]
    assert ev["forced_answer"] and ev["seg_tokens"] == [1]
    assert 0.0 <= ev["agreement_dice_mean"] <= 1.0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["naive_vs_optimised"]["sa2va-tiny"]["ratio"] > 0
    assert "sa2va-tiny" in summary["eval_forward_vs_generate"]
