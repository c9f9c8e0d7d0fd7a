"""patch_sam2.py: decorators found by syntax, removed by exact span, every other byte kept."""

from __future__ import annotations

import ast
import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sa2va.errors import UserError
from sa2va.patching import find_grad_decorators, strip_grad_decorators

REPO = Path(__file__).resolve().parent.parent

TRICKY = '''"""A made-up sam2.py with every spelling the patcher must handle."""
import torch
import torch as th
import torch.autograd as ag
from torch import no_grad, inference_mode as infer
from functools import lru_cache


def plain_helper(x):
    with torch.no_grad():  # a block: must stay
        return x


class PositionEmbeddingSine:
    @torch.no_grad()
    def encode_boxes(self, boxes):
        return boxes

    @torch.no_grad  # no parentheses
    def encode_points(self, points):
        with torch.no_grad():
            return points

    @staticmethod
    # a comment between stacked decorators
    @th.no_grad()
    # another comment
    @lru_cache(maxsize=None)
    def forward(x):
        return x


class SAM2VideoPredictor:
    @torch.inference_mode(
        mode=True,
    )  # a multi-line decorator
    def propagate_in_video_preflight(self):
        pass

    @infer()
    def propagate_in_video(self):
        yield 1

    @torch.inference_mode(False)
    def needs_grad(self):
        pass

    class Inner:
        class Deeper:
            @no_grad()
            async def step(self):
                return 1

        @ag.no_grad()
        def by_module_alias(self):
            pass

        @torch.autograd.no_grad()
        def by_autograd(self):
            pass

    @\\
    torch.inference_mode
    def continued(self):
        pass


@torch.no_grad()
class DecoratedClass:  # class decorators are not function decorators: kept
    pass


def outer():
    @torch.no_grad()
    def inner():
        return 2
    return inner
'''

EXPECTED = [
    ("PositionEmbeddingSine.encode_boxes", "@torch.no_grad()"),
    ("PositionEmbeddingSine.encode_points", "@torch.no_grad"),
    ("PositionEmbeddingSine.forward", "@th.no_grad()"),
    ("SAM2VideoPredictor.propagate_in_video_preflight", "@torch.inference_mode(mode=True)"),
    ("SAM2VideoPredictor.propagate_in_video", "@infer()"),
    ("SAM2VideoPredictor.Inner.Deeper.step", "@no_grad()"),
    ("SAM2VideoPredictor.Inner.by_module_alias", "@ag.no_grad()"),
    ("SAM2VideoPredictor.Inner.by_autograd", "@torch.autograd.no_grad()"),
    ("SAM2VideoPredictor.continued", "@torch.inference_mode"),
    ("outer.<locals>.inner", "@torch.no_grad()"),
]

FUNCTIONS = ["plain_helper", "encode_boxes", "encode_points", "forward", "propagate_in_video_preflight",
             "propagate_in_video", "needs_grad", "step", "by_module_alias", "by_autograd", "continued",
             "outer", "inner"]


def removed_lines(source: str, found) -> str:
    lines = source.splitlines(keepends=True)
    out = []
    for f in found:
        out.extend(lines[f.lineno - 1:f.end_lineno])
    return "".join(out)


def kept_lines(source: str, found) -> list[str]:
    drop = {n for f in found for n in range(f.lineno, f.end_lineno + 1)}
    return [line for i, line in enumerate(source.splitlines(keepends=True), 1) if i not in drop]


def function_names(source: str) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "patch_sam2.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_strip_tricky_cases(newline):
    source = TRICKY.replace("\n", newline)
    new, found = strip_grad_decorators(source)
    assert [(f.qualname, f.text) for f in found] == EXPECTED
    # every byte outside the removed decorator lines is unchanged, in order
    assert new == "".join(kept_lines(source, found))
    # the removed text holds only decorators (and their trailing comments)
    removed = removed_lines(source, found)
    assert "def " not in removed and "with " not in removed and "lru_cache" not in removed
    assert len(source) - len(new) == sum(f.span[1] - f.span[0] for f in found)
    for f in found:
        assert source[f.span[0]:f.span[1]].lstrip().startswith("@")
        assert source[f.span[0]:f.span[1]].endswith(newline)
    # still valid Python with every function, the blocks and the kept decorators in place
    assert function_names(new) == set(FUNCTIONS)
    assert new.count("with torch.no_grad():") == 2
    assert "@torch.inference_mode(False)" in new
    assert "@staticmethod" in new and "@lru_cache(maxsize=None)" in new
    assert "# a comment between stacked decorators" in new and "# another comment" in new
    assert "@torch.no_grad()\nclass DecoratedClass".replace("\n", newline) in new
    if newline == "\r\n":
        assert "\n" not in new.replace("\r\n", "")
    # idempotent
    again, found_again = strip_grad_decorators(new)
    assert found_again == [] and again == new


def test_inference_mode_false_is_reported_as_kept():
    kept = [f for f in find_grad_decorators(TRICKY, include_kept=True) if not f.strip]
    assert [(f.qualname, f.text) for f in kept] == [("SAM2VideoPredictor.needs_grad", "@torch.inference_mode(False)")]
    assert "enables gradients" in kept[0].note


def test_unknown_names_are_not_stripped():
    source = ("from mylib import no_grad\nimport torch\n\nclass SAM2Base:\n    @no_grad()\n    def a(self): pass\n\n"
              "    @torch.enable_grad()\n    def b(self): pass\n")
    assert find_grad_decorators(source) == []


def test_star_import_and_grad_mode_paths():
    source = ("from torch import *\nfrom torch.autograd.grad_mode import inference_mode as im\n"
              "def a():\n    pass\n@no_grad()\ndef b(): pass\n@im(mode=1)\ndef c(): pass\n")
    assert [f.qualname for f in find_grad_decorators(source)] == ["b", "c"]


def test_syntax_error_is_named():
    with pytest.raises(UserError, match=r"bad\.py is not valid Python \(line 2"):
        find_grad_decorators("x = 1\ndef (:\n", filename="bad.py")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sam2.py").write_bytes(TRICKY.replace("\n", "\r\n").encode())
    os.chmod(folder / "sam2.py", 0o640)
    return folder


def test_cli_patch_check_idempotent_revert(model_dir):
    sam2 = model_dir / "sam2.py"
    original = sam2.read_bytes()

    check = run_cli(str(model_dir), "--check")
    assert check.returncode == 1, check.stderr
    assert "SAM2VideoPredictor.propagate_in_video (line" in check.stdout

    first = run_cli(str(model_dir))
    assert first.returncode == 0, first.stderr
    for qualname, text in EXPECTED:
        assert f"{qualname} (line" in first.stdout and text in first.stdout
    assert "stripped 10 decorator(s)" in first.stdout
    assert "needs_grad" in first.stdout and "enables gradients" in first.stdout
    patched = sam2.read_bytes()
    assert patched == strip_grad_decorators(original.decode())[0].encode()
    assert (model_dir / "sam2.py.orig").read_bytes() == original
    assert stat.S_IMODE(sam2.stat().st_mode) == 0o640
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]

    mtime = sam2.stat().st_mtime_ns
    second = run_cli(str(model_dir))
    assert second.returncode == 0 and "nothing to strip: already patched" in second.stdout
    assert sam2.read_bytes() == patched and sam2.stat().st_mtime_ns == mtime

    check = run_cli(str(model_dir), "--check")
    assert check.returncode == 0, check.stdout

    revert = run_cli(str(model_dir), "--revert")
    assert revert.returncode == 0, revert.stderr
    assert sam2.read_bytes() == original
    assert stat.S_IMODE(sam2.stat().st_mode) == 0o640


def test_cli_accepts_the_file_itself_and_dry_run_writes_nothing(model_dir):
    sam2 = model_dir / "sam2.py"
    before = sam2.read_bytes()
    out = run_cli(str(sam2), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "--- a/sam2.py" in out.stdout and "-    @torch.no_grad()" in out.stdout
    assert sam2.read_bytes() == before
    assert sorted(p.name for p in model_dir.iterdir()) == ["sam2.py"]


def test_backup_written_once_and_kept(model_dir):
    sam2 = model_dir / "sam2.py"
    assert run_cli(str(model_dir)).returncode == 0
    first_backup = (model_dir / "sam2.py.orig").read_bytes()
    # a newer version of the file appears and is patched: the first backup is never replaced
    sam2.write_text(TRICKY.replace("return x\n", "return x + 1\n"))
    out = run_cli(str(model_dir))
    assert out.returncode == 0, out.stderr
    assert (model_dir / "sam2.py.orig").read_bytes() == first_backup
    assert "already exists and holds a different version" in out.stdout
    # reverting now would discard a change the tool did not make: refused without --force
    refused = run_cli(str(model_dir), "--revert")
    assert refused.returncode != 0 and "has changed since" in refused.stderr
    assert run_cli(str(model_dir), "--revert", "--force").returncode == 0
    assert sam2.read_bytes() == first_backup


def test_revert_without_backup_is_an_error(model_dir):
    out = run_cli(str(model_dir), "--revert")
    assert out.returncode != 0
    assert "no backup" in out.stderr and "sam2.py.orig" in out.stderr


def test_non_python_and_non_sa2va_files_refused(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "sa2va_chat",\n "x": [1, 2\n}\n')
    out = run_cli(str(cfg))
    assert out.returncode != 0 and "config.json is not valid Python" in out.stderr and "line" in out.stderr
    assert cfg.read_text().startswith('{"model_type"')

    binary = tmp_path / "weights.py"
    binary.write_bytes(b"\x00\xff\xfe\x00garbage")
    out = run_cli(str(binary))
    assert out.returncode != 0 and "weights.py" in out.stderr and "Traceback" not in out.stderr

    other = tmp_path / "other.py"
    other.write_text("import torch\n\n@torch.no_grad()\ndef f():\n    pass\n")
    out = run_cli(str(other))
    assert out.returncode != 0 and "does not look like Sa2VA's sam2.py" in out.stderr and "--force" in out.stderr
    assert "@torch.no_grad()" in other.read_text()
    forced = run_cli(str(other), "--force")
    assert forced.returncode == 0 and "@torch" not in other.read_text()


def test_folder_without_sam2_and_missing_path(tmp_path):
    (tmp_path / "modeling_sa2va_chat.py").write_text("x = 1\n")
    out = run_cli(str(tmp_path))
    assert out.returncode != 0 and "holds no sam2.py" in out.stderr and "modeling_sa2va_chat.py" in out.stderr
    out = run_cli(str(tmp_path / "nope"))
    assert out.returncode != 0 and "does not exist" in out.stderr


def test_no_argument_uses_default_config_path(tmp_path):
    # run from a folder where the default model.path (relative) does not exist
    out = run_cli(cwd=tmp_path)
    assert out.returncode != 0
    assert ("no model folder given and the default config's model.path (models/sa2va_vessel_hf, from "
            "configs/v8.yaml) does not exist: run `python patch_sam2.py MODEL_DIR`") in out.stderr
    assert "Traceback" not in out.stderr
    folder = tmp_path / "models" / "sa2va_vessel_hf"
    folder.mkdir(parents=True)
    (folder / "sam2.py").write_text(TRICKY)
    out = run_cli(cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "using model.path of configs/v8.yaml" in out.stdout and "stripped 10" in out.stdout


# ----------------------------------------------------------------------------- the tiny checkpoint

TINY_EXPECTED = [
    "PositionEmbeddingSine.encode_boxes",
    "PositionEmbeddingSine.encode_points",
    "PositionEmbeddingSine.forward",
    "SAM2VideoPredictor.propagate_in_video_preflight",
    "SAM2VideoPredictor.propagate_in_video",
]


def _tiny_available() -> bool:
    return importlib.util.find_spec("sa2va.tiny") is not None


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory):
    import inspect

    from sa2va import tiny

    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    if "weights" in inspect.signature(tiny.write_tiny_checkpoint).parameters:
        tiny.write_tiny_checkpoint(out, weights=False)
    else:
        tiny.write_tiny_checkpoint(out)
    return out


@pytest.mark.skipif(not _tiny_available(), reason="sa2va.tiny is not there yet")
def test_tiny_checkpoint_has_exactly_the_five_release_decorators(tiny_sam2):
    source = (tiny_sam2 / "sam2.py").read_text()
    found = find_grad_decorators(source)
    assert [f.qualname for f in found] == TINY_EXPECTED
    assert [f.text for f in found] == ["@torch.no_grad()"] * 3 + ["@torch.inference_mode()"] * 2
    out = run_cli(str(tiny_sam2))
    assert out.returncode == 0, out.stderr
    assert "stripped 5 decorator(s)" in out.stdout
    assert find_grad_decorators((tiny_sam2 / "sam2.py").read_text()) == []
    assert run_cli(str(tiny_sam2), "--check").returncode == 0


def test_symlinked_sam2_is_replaced_not_followed(tmp_path):
    # huggingface_hub snapshots link sam2.py to a content-addressed blob: the blob must not change
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_text(TRICKY)
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "sam2.py").symlink_to(blob)
    out = run_cli(str(folder))
    assert out.returncode == 0, out.stderr
    assert blob.read_text() == TRICKY
    assert not (folder / "sam2.py").is_symlink()
    assert (folder / "sam2.py").read_text() == strip_grad_decorators(TRICKY)[0]
    assert (folder / "sam2.py.orig").read_text() == TRICKY
