"""The user's family (Sa2VA-8B/26B, InternLM2 LLM) on transformers 5.x, on the tiny look-alike.

`python -m sa2va.tiny --family internlm2` writes an InternLM2-shaped remote-code folder with the
release's quirks; these tests check that it has them, that the suite's one loading road repairs
them (token ids, LLM outputs, generate), that it trains, exports and evaluates, and that the
self-check refuses what cannot be repaired.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_ok
from sa2va.errors import UserError

QUESTION, ANSWER = "Please segment the blood vessels.", "It is [SEG]."


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from sa2va.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("internlm2") / "tiny", seed=0, family="internlm2")


@pytest.fixture(scope="module")
def loaded(folder):
    from sa2va.model import load_sa2va

    return load_sa2va(folder, trust_remote_code=True, device="cpu", dtype="float32")


def declared_ids(folder: Path) -> dict[str, int]:
    decoder = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {entry["content"]: int(tid) for tid, entry in decoder.items()}


def copy_folder(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def run_fail(cmd: list[str]) -> str:
    """Exit code 2 and exactly one `error:` line, no traceback; returns that line."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, f"{cmd} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- the look-alike


def test_folder_has_the_release_layout_and_quirks(folder):
    from transformers import AutoModel, AutoTokenizer

    from sa2va import compat

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["template"] == "internlm2_chat"
    assert cfg["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert cfg["llm_config"]["rope_scaling"] is None
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "InternLM2Tokenizer"
    assert tok_cfg["auto_map"]["AutoTokenizer"] == ["tokenization_internlm2.InternLM2Tokenizer",
                                                    "tokenization_internlm2_fast.InternLM2TokenizerFast"]
    # The six placeholders at the end of tokenizer.model, renamed to the chat tokens.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tail = [sp.id_to_piece(i) for i in range(sp.get_piece_size() - 6, sp.get_piece_size())]
    assert tail == [f"[UNUSED_TOKEN_{n}]" for n in range(141, 147)]
    ids = declared_ids(folder)
    assert [ids[t] for t in ("<|plugin|>", "<|im_end|>", "<|im_start|>")] == [
        sp.get_piece_size() - 6, sp.get_piece_size() - 2, sp.get_piece_size() - 1]
    # Plain transformers 5.x meets the release's failures on this folder:
    compat.install_import_shims()
    compat.ensure_post_init(folder, cfg["auto_map"]["AutoModel"])
    with pytest.raises(KeyError, match="type"):  # _init_rope reads rope_scaling['type']
        AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    auto = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, use_fast=False)
    if type(auto).__name__ != "InternLM2TokenizerFast":
        pytest.skip("this transformers honours use_fast=False again")
    assert auto.convert_tokens_to_ids("[SEG]") == ids["[SEG]"] + 6  # the silent shift of breakage 6


def test_family_flag_refuses_what_does_not_exist(tmp_path):
    from sa2va.tiny import write_tiny_checkpoint

    with pytest.raises(UserError, match="unknown family 'llama'"):
        write_tiny_checkpoint(tmp_path / "a", family="llama")
    with pytest.raises(UserError, match="preset '26b' is of the internlm2 family, not 'qwen2'"):
        write_tiny_checkpoint(tmp_path / "b", preset="26b", weights=False, family="qwen2")
    assert not list(tmp_path.iterdir())


def test_tokenizer_model_is_deterministic(tmp_path):
    from sa2va import tiny, tiny_internlm2

    lines = tiny._CORPUS.splitlines() + tiny.WARMUP_PROMPTS
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tiny_internlm2.write_tokenizer(tmp_path / name, lines)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# --------------------------------------------------------------------------- loading road


def test_token_ids_are_the_slow_tokenizers(folder, loaded):
    from sa2va.model import prompt_ids
    from sa2va.remote_code.tokenization_internlm2 import InternLM2Tokenizer

    slow = InternLM2Tokenizer.from_pretrained(str(folder))
    ids = declared_ids(folder)
    assert type(loaded.tokenizer).__name__ == "InternLM2Tokenizer"
    for token in ("[SEG]", "<IMG_CONTEXT>", "<img>", "</img>", "<|im_start|>", "<|im_end|>"):
        assert loaded.tokenizer.convert_tokens_to_ids(token) == slow.convert_tokens_to_ids(token) == ids[token]
    assert loaded.seg_token_id == ids["[SEG]"] and loaded.img_context_token_id == ids["<IMG_CONTEXT>"]
    got = prompt_ids(loaded, 1, QUESTION, ANSWER)  # the full templated prompt the forward feeds
    image = "<img>" + "<IMG_CONTEXT>" * loaded.num_image_token + "</img>"
    text = f"<|im_start|>user\n{image}\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER}"
    assert got == slow(text, add_special_tokens=False)["input_ids"]
    assert max(got) < loaded.llm.get_input_embeddings().weight.shape[0]


def reference_logits(weights: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """InternLM2 in plain PyTorch, fp32, from the checkpoint's tensors (independent of its code)."""
    p = "language_model."
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, groups, eps, n = hidden // heads, heads // kv, cfg["rms_norm_eps"], len(ids)
    angles = torch.outer(torch.arange(n, dtype=torch.float64),
                         1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cos, sin = angles.cos().float(), angles.sin().float()

    def rope(x):  # (heads, n, d): dims i and i + d/2 rotate together
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    causal = torch.full((n, n), float("-inf")).triu(1)
    h = weights[p + "model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        w = {k[len(f"{p}model.layers.{i}."):]: v for k, v in weights.items() if k.startswith(f"{p}model.layers.{i}.")}
        x = rms(h, w["attention_norm.weight"])
        qkv = (x @ w["attention.wqkv.weight"].T).view(n, kv, groups + 2, d)  # per kv group: q..., k, v
        q = rope(qkv[:, :, :groups].reshape(n, heads, d).transpose(0, 1))
        k = rope(qkv[:, :, groups].transpose(0, 1)).repeat_interleave(groups, 0)
        v = qkv[:, :, groups + 1].transpose(0, 1).repeat_interleave(groups, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, dim=-1) @ v
        h = h + att.transpose(0, 1).reshape(n, hidden) @ w["attention.wo.weight"].T
        x = rms(h, w["ffn_norm.weight"])
        h = h + (F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T)) @ w[
            "feed_forward.w2.weight"].T
    return rms(h, weights[p + "model.norm.weight"]) @ weights[p + "output.weight"].T


def llm_logits(sa2va, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return sa2va.model.language_model(input_ids=torch.tensor([ids])).logits[0].float()


def test_loaded_llm_equals_a_plain_pytorch_reference(folder, loaded):
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())["llm_config"]
    assert not cfg.get("bias")  # the reference has no biases, like InternLM2.5
    ids = loaded.tokenizer(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER}",
                           add_special_tokens=False)["input_ids"]
    expected = reference_logits(load_file(str(folder / "model.safetensors")), cfg, ids)
    assert (llm_logits(loaded, ids) - expected).abs().max().item() < 1e-4


def test_generate_works_and_its_cache_changes_nothing(loaded):
    from PIL import Image

    lm = loaded.model.language_model
    ids = torch.tensor([loaded.tokenizer(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
                                         add_special_tokens=False)["input_ids"]])
    embeds = lm.get_input_embeddings()(ids)
    with torch.no_grad():
        cached = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False)[0].tolist()
        greedy: list[int] = []  # the same greedy decoding, recomputing the whole sequence each step
        for _ in range(6):
            new = lm.get_input_embeddings()(torch.tensor([greedy], dtype=torch.long))
            greedy.append(int(lm(inputs_embeds=torch.cat([embeds, new], 1), use_cache=False).logits[0, -1].argmax()))
    assert cached == greedy
    image = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    out = loaded.model.predict_forward(image=image, text="<image>\n" + QUESTION, tokenizer=loaded.tokenizer)
    assert "[SEG]" in out["prediction"]
    assert len(out["prediction_masks"]) == 1 and out["prediction_masks"][0].shape == (1, 48, 64)


def _attention_classes(sa2va, eager: bool) -> None:
    """Put the loaded LLM's attention modules on the release's eager class (or back on SDPA)."""
    from sa2va import compat

    for module in sa2va.llm.modules():
        cls = type(module)
        if getattr(cls, "_sa2va_dpo_sdpa", False) and eager:
            module.__class__ = cls.__mro__[1]
        elif not eager and cls in compat._SDPA_CLASSES:
            module.__class__ = compat._SDPA_CLASSES[cls]


def test_sdpa_attention_equals_the_release_eager_one(loaded, monkeypatch):
    """compat.use_sdpa_attention: the same hidden states, input gradients and cached generation
    as the release's eager attention, with left and right padding."""
    from sa2va import compat

    n_layers = len(loaded.llm.model.layers)
    assert sum(getattr(type(m), "_sa2va_dpo_sdpa", False) for m in loaded.llm.modules()) == n_layers
    decoder = loaded.llm.model
    ids = torch.tensor(loaded.tokenizer([QUESTION, ANSWER, QUESTION + " " + ANSWER], add_special_tokens=False,
                                        padding="longest")["input_ids"])
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    embeds = decoder.get_input_embeddings()(ids).detach()

    def run(eager: bool):
        _attention_classes(loaded, eager)
        try:
            x = embeds.clone().requires_grad_(True)
            hidden = decoder(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
            (hidden * mask[..., None]).square().sum().backward()
            with torch.no_grad():
                tokens = loaded.llm.generate(inputs_embeds=embeds[:1, :5], attention_mask=mask[:1, :5],
                                             max_new_tokens=5, do_sample=False, output_scores=True,
                                             return_dict_in_generate=True)
            return hidden.detach(), x.grad, tokens.sequences, torch.stack(tokens.scores)
        finally:
            _attention_classes(loaded, False)

    eager, sdpa = run(True), run(False)
    valid = mask.bool()
    assert (eager[0][valid] - sdpa[0][valid]).abs().max().item() < 1e-5  # padded query rows are never read
    grad = eager[1][valid]
    assert (grad - sdpa[1][valid]).abs().max().item() < 1e-4 * grad.abs().max().item()  # float32 sums
    assert torch.equal(eager[2], sdpa[2])
    assert (eager[3] - sdpa[3]).abs().max().item() < 1e-4
    monkeypatch.setenv(compat.ATTENTION_ENV, "eager")  # the opt-out switches nothing
    _attention_classes(loaded, True)
    try:
        assert compat.use_sdpa_attention(loaded.model) == 0
    finally:
        _attention_classes(loaded, False)


def test_sharded_bin_weights_load_the_same(folder, loaded, tmp_path):
    from safetensors.torch import load_file

    from sa2va.model import load_sa2va

    sharded = copy_folder(folder, tmp_path / "sharded")
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for part, chunk in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"pytorch_model-{part:05d}-of-00002.bin"
        torch.save({k: state[k] for k in chunk}, sharded / name)
        weight_map.update({k: name for k in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (sharded / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    again = load_sa2va(sharded, trust_remote_code=True, device="cpu", dtype="float32")
    ids = loaded.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert ids and torch.equal(llm_logits(again, ids), llm_logits(loaded, ids))


# --------------------------------------------------------------------------- self-check


def test_self_check_refuses_a_corrupted_rotary_buffer(folder, tmp_path):
    """A checkpoint that carries its rotary inv_freq (persistent), damaged in one layer."""
    from safetensors.torch import load_file, save_file

    from sa2va.model import load_sa2va

    bad = copy_folder(folder, tmp_path / "rotary")
    code = (bad / "modeling_internlm2.py").read_text()
    old = 'self.register_buffer("inv_freq", inv_freq, persistent=False)'
    assert code.count(old) == 2
    (bad / "modeling_internlm2.py").write_text(code.replace(old, old.replace("False", "True"), 1))
    cfg = json.loads((bad / "config.json").read_text())["llm_config"]
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    good = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    state = load_file(str(bad / "model.safetensors"))
    for i in range(cfg["num_hidden_layers"]):
        state[f"language_model.model.layers.{i}.attention.rotary_emb.inv_freq"] = good * (1.5 if i == 1 else 1.0)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"rotary frequencies of language_model\.model\.layers\.1\.attention"
                                        r"\.rotary_emb .*rope_theta"):
        load_sa2va(bad, trust_remote_code=True, device="cpu", dtype="float32")


def test_self_check_refuses_a_seg_id_outside_the_embedding(folder, tmp_path):
    from sa2va.model import load_sa2va

    bad = copy_folder(folder, tmp_path / "seg")
    tok_cfg = json.loads((bad / "tokenizer_config.json").read_text())
    decoder = tok_cfg["added_tokens_decoder"]
    seg = next(tid for tid, entry in decoder.items() if entry["content"] == "[SEG]")
    decoder["700"] = decoder.pop(seg)
    (bad / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(UserError, match=r"self-check of .*seg: token \[SEG\] has id 700, but the LLM embedding has"):
        load_sa2va(bad, trust_remote_code=True, device="cpu", dtype="float32")


def test_unknown_llm_family_is_one_line_and_writes_nothing(folder, tmp_path):
    from sa2va.synth import write_dataset

    bad = copy_folder(folder, tmp_path / "arch")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["llm_config"]["architectures"] = ["MambaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    data = write_dataset(tmp_path / "data", n=1, size=64, seed=0)
    line = run_fail([sys.executable, "evaluate.py", "--model", str(bad), "--data", str(data),
                     "--out", str(tmp_path / "out"), "--trust-remote-code"])
    assert str(bad) in line and "MambaForCausalLM" in line and "llm_config.architectures[0]" in line
    assert not (tmp_path / "out").exists()


def test_missing_sentencepiece_is_named(folder, monkeypatch):
    from sa2va import compat

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece now fails
    with pytest.raises(UserError, match=r"tokenizer of .*tokenization_internlm2\.py\) needs the sentencepiece "
                                        r"package, which is not installed: pip install sentencepiece"):
        compat.load_tokenizer(folder, trust_remote_code=True)


# --------------------------------------------------------------------------- train, export, evaluate


def test_train_export_reload_and_evaluate(folder, loaded, tmp_path):
    from sa2va.checkpoint import load_for_inference
    from sa2va.model import encode_frozen, load_sa2va, prepare_images, seg_logits
    from sa2va.synth import write_dataset, write_dilated_pairs

    pairs = write_dilated_pairs(tmp_path / "pairs", n=4, size=64, seed=1)
    run = tmp_path / "run"
    run_ok([sys.executable, "train_dpo.py", "--cfg", "tiny", f"model.path={folder}", f"data.root={pairs}",
            f"output_dir={run}", "max_steps=2", "train.micro_batch_size=1", "train.save_every=0",
            "lora.dropout=0.0"])
    policy = load_for_inference(run / "checkpoints" / "step_0000002", True, device="cpu", dtype="float32")
    final = load_sa2va(run / "final", trust_remote_code=True, device="cpu", dtype="float32")
    ids = final.tokenizer(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER}",
                          add_special_tokens=False)["input_ids"]
    trained = llm_logits(policy, ids)
    assert (llm_logits(final, ids) - trained).abs().max().item() < 1e-5
    assert (llm_logits(loaded, ids) - trained).abs().max().item() > 1e-5  # training changed the LLM
    image = (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        masks = [seg_logits(s, encode_frozen(s, prepare_images(s, [image])), QUESTION, ANSWER) for s in (policy, final)]
    assert (masks[0] - masks[1]).abs().max().item() < 1e-4

    data = write_dataset(tmp_path / "data", n=2, size=64, seed=0)
    out = tmp_path / "eval"
    run_ok([sys.executable, "evaluate.py", "--model", str(run / "final"), "--trust-remote-code", "--path", "both",
            "--data", str(data), "--out", str(out)])
    agreement = json.loads((out / "results.json").read_text())["agreement"]
    assert agreement["fraction_with_seg"] == 1.0 and agreement["mean_dice"] >= 0.99, agreement
