"""Config: YAML + overrides into the dataclass tree, refused before any work when wrong."""

import subprocess
import sys
from pathlib import Path

import pytest

from sa2va.config import CONFIG_DIR, load_config, resolve_config_path
from sa2va.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def test_every_shipped_config_loads():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.trust_remote_code is True, path


def test_seed_table_values():
    lrs = {"v6": 1e-6, "v7": 1e-6, "v8": 1e-6, "v8b": 5e-5, "v8c": 1e-5}
    for name, lr in lrs.items():
        cfg = load_config(name)
        assert cfg.optim.lr == pytest.approx(lr)
        assert cfg.loss.beta == 0.2 and cfg.lora.r == 16 and cfg.train.pairs_per_step == 4
        assert cfg.data.max_samples == 500 and cfg.loss.dice_dpo == 1.0
    assert load_config("v8").loss.dice == 1.0


def test_name_resolution_finds_configs_folder():
    assert resolve_config_path("v8.yaml") == CONFIG_DIR / "v8.yaml"
    assert resolve_config_path("configs/v8.yaml").name == "v8.yaml"
    assert resolve_config_path("v8") == CONFIG_DIR / "v8.yaml"
    with pytest.raises(UserError, match="not found"):
        resolve_config_path("v99")


def test_overrides_are_typed():
    cfg = load_config("v8", ["optim.lr=3e-5", "max_steps=4", "model.path=/x", "lora.target_modules=[q_proj]",
                             "data.max_samples=null", "train.cache_frozen=false"])
    assert cfg.optim.lr == 3e-5 and cfg.max_steps == 4 and cfg.model.path == "/x"
    assert cfg.lora.target_modules == ["q_proj"] and cfg.data.max_samples is None
    assert cfg.train.cache_frozen is False


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.lr=abc", "optim.lr"),
        ("train.grad_accum=1.5", "train.grad_accum"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("loss.mask_dpo_norm=median", "loss.mask_dpo_norm"),
        ("dist.strategy=zero3", "dist.strategy"),
        ("dist.fsdp_gather=never", "dist.fsdp_gather"),
        ("model.answer=hello", "model.answer"),
        ("nokey", "nokey"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_config("v8", [override])


def test_unknown_yaml_key_and_wrong_type_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-6\n  warmup: 3\n")
    with pytest.raises(UserError, match="optim.warmup"):
        load_config(bad)
    bad.write_text("train:\n  grad_accum: four\n")
    with pytest.raises(UserError, match="train.grad_accum"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)


def test_print_config_cli():
    out = subprocess.run([sys.executable, "train_dpo.py", "--cfg", "v8.yaml", "--print-config", "optim.lr=2e-6"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "lr: 2.0e-06" in out and "dice_dpo: 1.0" in out
    bad = subprocess.run([sys.executable, "train_dpo.py", "--cfg", "v8.yaml", "--print-config", "optim.nope=1"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip().splitlines()[-1]]  # one line, no traceback
    assert "optim.nope" in bad.stderr


@pytest.mark.parametrize(
    "cfg, overrides, named",
    [
        ("grpo", ["loss.samples=1"], "loss.samples"),
        ("grpo", ["loss.reward=iou"], "loss.reward"),
        ("grpo", ["loss.kl=-1"], "loss.kl"),
        ("grpo", ["data.refresh_every=5"], "data.refresh_every"),  # GRPO uses no rejected masks
        ("online_dpo", ["model.random_weights=true"], "data.refresh_every"),  # no predictions to refresh from
        ("online_dpo", ["data.refresh_thresholds=[]"], "data.refresh_every"),
        ("online_dpo", ["data.refresh_thresholds=[1.5]"], "data.refresh_thresholds"),
        ("online_dpo", ["data.refresh_min_gap=0"], "data.refresh_min_gap"),
    ],
)
def test_online_and_grpo_keys_are_refused_by_name(cfg, overrides, named):
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_config(cfg, overrides)
