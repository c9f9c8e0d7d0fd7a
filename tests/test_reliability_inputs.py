"""Reliability, part 3: the bad-input corpus through curate_data.py, train_dpo.py and evaluate.py.

Every input of tests/bad_inputs/ (and the model folders built from the tiny checkpoint) goes
through each command it applies to, in-process (the commands' own `main`), and must end as
the case says: refused with a one-line error that names the file or key (UserError, exit 2),
skipped where a skip is documented, or accepted where the input is valid by design. The model
is never loaded for a data problem: `load_sa2va` / `load_model` are replaced by a tripwire, so
an input that gets through shows as "accepted (reached model load)". After a refusal the
output folder holds no file (no checkpoint, no reference logits, no results.json, no
dpo_annotations.json, no staging folder).

The CLI wrapper (one `error:` line on stderr, exit 2) is the same `run_cli` for all three
commands; test_reliability.py runs it as real processes (full disk, unwritable folder).

SA2VA_RELIABILITY_TABLE=FILE writes the markdown table of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from scipy import ndimage

from sa2va.errors import UserError

BAD = REPO / "tests" / "bad_inputs"
OUTCOMES: list[dict] = []


class Tripwire(Exception):
    """Raised where the model would load (or, for model-folder cases, right after it loaded)."""


# --------------------------------------------------------------------------- folders


def data_folder(root: Path, image: str = "image.png", mask: str | None = "mask.png", second: bool = True) -> Path:
    """DATA/images/a.EXT + masks/a.EXT from the corpus, each keeping its file's extension (+ a good
    b.png): evaluate and curate read it."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    shutil.copyfile(BAD / image, root / "images" / f"a{Path(image).suffix}")
    if mask is not None:
        shutil.copyfile(BAD / mask, root / "masks" / f"a{Path(mask).suffix}")
    if second:
        shutil.copyfile(BAD / "image.png", root / "images" / "b.png")
        shutil.copyfile(BAD / "mask.png", root / "masks" / "b.png")
    return root


def pair_folder(root: Path, pairs: str | None = None, image: str = "image.png", chosen: str = "mask.png") -> Path:
    """A pair folder (train_dpo.py's data.root): one pair a.png, its files from the corpus."""
    from sa2va.fileio import read_mask, write_mask

    data_folder(root, image=image, mask=chosen, second=False)
    write_mask(root / "rejected_masks" / "a.png", ndimage.binary_dilation(read_mask(BAD / "mask.png")))
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copyfile(BAD / "image.png", outside / "a.png")
    (root / "images" / "link.png").symlink_to(outside / "a.png")  # a link that leaves the root
    if pairs is None:
        entries = [{"image": f"images/a{Path(image).suffix}", "chosen_mask": f"masks/a{Path(chosen).suffix}",
                    "rejected_mask": "rejected_masks/a.png"}]
        (root / "dpo_annotations.json").write_text(json.dumps(entries))
    elif pairs != "none":
        shutil.copyfile(BAD / pairs, root / "dpo_annotations.json")
    return root


def model_folder(tiny: Path, root: Path, kind: str) -> Path:
    """A copy of the tiny checkpoint with one problem (the weights linked, not copied)."""
    folder = root / f"model_{kind}"  # a distinct name: HF caches remote code by folder name
    if kind == "missing":
        return folder
    folder.mkdir(parents=True)
    for item in tiny.iterdir():
        if item.name == "model.safetensors":
            (folder / item.name).symlink_to(item)
        else:
            shutil.copyfile(item, folder / item.name)
    config = folder / "config.json"
    if kind == "no_config":
        config.unlink()
    elif kind == "config_not_json":
        config.write_text('{"model_type": "sa2va_chat",')
    elif kind == "wrong_model_type":
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "llama"}))
    elif kind == "no_modeling_code":
        (folder / "modeling_sa2va_chat.py").unlink()
    elif kind == "no_sam2_code":
        (folder / "sam2.py").unlink()
    elif kind == "no_weights":
        (folder / "model.safetensors").unlink()
    elif kind == "truncated_weights":
        data = (tiny / "model.safetensors").read_bytes()
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    elif kind != "untrusted":
        raise ValueError(kind)
    return folder


def import_source(root: Path, kind: str) -> Path:
    """A downloaded public set (tests/layouts.py) with one problem, for python -m sa2va.datasets."""
    from layouts import grey, sample, save, write_chase, write_drive

    if kind.startswith("drive"):
        src = write_drive(root / "DRIVE")
        if kind == "drive_no_manual":
            (src / "training" / "1st_manual" / "22_manual1.gif").unlink()
        elif kind == "drive_gif_three":
            levels = grey(sample(21)[1])
            levels[0, :4] = 128
            save(src / "training" / "1st_manual" / "21_manual1.gif", levels, "GIF", mode="P")
        elif kind == "drive_truncated_tif":
            tif = src / "training" / "images" / "21_training.tif"
            tif.write_bytes(tif.read_bytes()[:500])
        return src
    src = write_chase(root / "CHASE_DB1")
    if kind == "chase_no_1stho":
        (src / "Image_01R_1stHO.png").unlink()
    elif kind == "chase_jpeg_mask":
        mask = src / "Image_01L_1stHO.png"
        save(src / "Image_01L_1stHO.jpg", np.asarray(Image.open(mask)), "JPEG", quality=90)
        mask.unlink()
    elif kind == "chase_dup_stem":
        shutil.copyfile(src / "Image_01L_1stHO.png", src / "Image_01L.png")
    return src


def training_checkpoint(root: Path, config: str) -> Path:
    """A folder evaluate.py takes for a training checkpoint, holding a bad config.yaml."""
    root.mkdir(parents=True)
    (root / "trained.safetensors").write_bytes(b"")
    shutil.copyfile(BAD / config, root / "config.yaml")
    return root


# --------------------------------------------------------------------------- running a command


@dataclass
class Outcome:
    kind: str  # refused | accepted | crashed
    message: str


def invoke(command: str, argv: list[str], monkeypatch, model_stage: bool) -> Outcome:
    """Run a command's main in-process with the tripwire set; classify how it ended.

    model_stage=False: the tripwire replaces the model load (data problems must stop before).
    model_stage=True: the model really loads; the tripwire fires at the first use after it.
    """
    import curate_data
    import train_dpo

    import sa2va.datasets as datasets
    import sa2va.evaluation as evaluation
    import sa2va.model as model

    def trip(*_a, **_k):
        raise Tripwire()

    if model_stage:
        monkeypatch.setattr(train_dpo, "add_lora_and_freeze", trip)
        monkeypatch.setattr(evaluation, "_predict_with_progress", trip)
        monkeypatch.setattr(model, "predict_probabilities", trip)
    else:
        monkeypatch.setattr(train_dpo, "load_sa2va", trip)
        monkeypatch.setattr(evaluation, "load_model", trip)
        monkeypatch.setattr(model, "load_sa2va", trip)
    main = {"train": train_dpo.main, "evaluate": evaluation.main, "curate": curate_data.main,
            "datasets": datasets.main}[command]
    try:
        code = main(argv)
    except Tripwire:
        return Outcome("accepted", "reached model load" if not model_stage else "model loaded")
    except UserError as err:
        return Outcome("refused", str(err))
    except SystemExit as err:  # argparse
        return Outcome("refused" if err.code == 2 else "crashed", f"exit {err.code}")
    except Exception as err:  # noqa: BLE001 - a traceback is a failure of the case
        return Outcome("crashed", f"{type(err).__name__}: {err}")
    return Outcome("accepted", f"exit {code}")


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    input: str  # what is wrong (the table's first column)
    command: str  # train | evaluate | curate
    expect: str  # refused | accepted | skipped
    names: tuple[str, ...] = ()  # substrings the message must hold
    kind: str = "data"  # data | pairs | yaml | model | out
    arg: str = ""  # the corpus file or the model-folder kind
    why: str = ""  # for accepted/skipped: the documented behaviour
    known_gap: str = ""  # an open problem (xfail, strict), with where it is fixed
    extra: tuple[str, ...] = ()  # more arguments for the command

    @property
    def id(self) -> str:
        return f"{self.command}-{self.kind}-{self.arg or self.input}".replace(" ", "_")


IMAGE_CASES = [
    ("truncated PNG image", "image_truncated.png", None, ("a.png", "cannot read image")),
    ("text file named .png", "image_not_png.png", None, ("a.png", "cannot read image")),
    ("0-byte image", "image_empty.png", None, ("a.png", "cannot read image")),
    ("truncated PNG mask", None, "mask_truncated.png", ("a.png", "cannot read mask")),
    ("mask of the wrong size", None, "mask_wrong_size.png", ("a.png", "12x16", "16x16")),
    ("RGBA mask drawn in the alpha channel", None, "mask_rgba_alpha.png", ("a.png", "transparency")),
    ("JPEG-noisy mask (grey levels)", None, "mask_jpeg_noisy.png", ("a.png", "not binary")),
    ("colour mask", None, "mask_colour.png", ("a.png", "colour")),
    ("truncated TIFF image", "image_truncated.tif", None, ("a.tif", "cannot read image")),
    ("GIF mask with three values", None, "mask_three_values.gif", ("a.gif", "not binary", "0, 128, 255")),
    ("JPEG mask (no --binarize)", None, "mask_jpeg.jpg", ("a.jpg", "JPEG", "values 0, 1, 2", "--binarize")),
]

CASES: list[Case] = []
for label, image, mask, names in IMAGE_CASES:
    arg = image or mask
    for command in ("curate", "train", "evaluate"):
        CASES.append(Case(label, command, "refused", names, "data", arg))
CASES += [
    Case("RGBA mask, opaque, grey in all channels", c, "accepted", kind="data", arg="mask_rgba_opaque.png",
         why="a grey mask saved as colour is read as grey") for c in ("curate", "train", "evaluate")
]
CASES += [
    Case("16-bit binary mask (0/65535)", c, "accepted", kind="data", arg="mask_16bit.png",
         why="a binary mask is read at any bit depth") for c in ("curate", "train", "evaluate")
]
CASES += [
    Case("empty mask (no vessel)", "curate", "refused", ("a.png", "empty"), "data", "mask_empty.png"),
    Case("empty mask (no vessel)", "curate --skip-bad", "skipped", ("a.png", "empty"), "data", "mask_empty.png",
         why="listed under `skipped` in curation_report.json; the other images are used"),
    Case("truncated PNG image", "curate --skip-bad", "skipped", ("a.png", "cannot read image"), "data",
         "image_truncated.png", why="listed under `skipped` in curation_report.json"),
    Case("empty mask (no vessel)", "train", "accepted", kind="data", arg="mask_empty.png",
         why="a chosen mask with no vessel is a valid target (an image without vessels)"),
    Case("empty mask (no vessel)", "evaluate", "accepted", kind="data", arg="mask_empty.png",
         why="scored with the empty-mask conventions of metrics.md"),
    Case("image without a mask", "curate", "refused", ("a.png", "has no mask"), "data", "no_mask"),
    Case("image without a mask (another image has one)", "evaluate", "refused", ("a.png", "has no mask", "--predict"),
         "data", "no_mask"),
    Case("JPEG mask with --binarize 127", "evaluate", "accepted", kind="data", arg="mask_jpeg.jpg",
         why="the user chose the threshold", extra=("--binarize", "127")),
]
CASES += [Case("two images with one name (a.png, a.jpg)", c, "refused", ("'a'", "a.png", "a.jpg"), "data", "dup_stem")
          for c in ("curate", "evaluate")]
IMPORT_CASES = [
    ("DRIVE image with no manual mask", "drive_no_manual", ("22_training", "22_manual1", "not found")),
    ("CHASE_DB1 folder missing a 1stHO mask", "chase_no_1stho", ("Image_01R", "1stHO", "not found")),
    ("DRIVE manual GIF with three values", "drive_gif_three", ("21_manual1.gif", "not binary", "0, 128, 255")),
    ("CHASE_DB1 JPEG mask (no --binarize)", "chase_jpeg_mask", ("Image_01L_1stHO.jpg", "JPEG", "values 0, 1")),
    ("DRIVE truncated TIFF image", "drive_truncated_tif", ("21_training.tif", "cannot read image")),
    ("two images with one name in CHASE_DB1 (Image_01L.jpg, .png)", "chase_dup_stem", ("Image_01L", "two images")),
]
CASES += [Case(label, "datasets", "refused", names, "import", arg) for label, arg, names in IMPORT_CASES]
CASES.append(Case("CHASE_DB1 JPEG mask with --binarize 127", "datasets", "accepted", kind="import",
                  arg="chase_jpeg_mask", why="the user chose the threshold", extra=("--binarize", "127")))

PAIR_CASES = [
    ("pair entry missing a key", "pairs_missing_key.json", ("entry 0", "rejected_mask")),
    ("duplicate pair ids", "pairs_duplicate_id.json", ("entry 1", "duplicate id 'a'")),
    ("path with ../", "pairs_dotdot.json", ("entry 0", "leaves the data folder")),
    ("absolute path", "pairs_absolute.json", ("entry 0", "absolute path")),
    ("symlink leaving the data root", "pairs_symlink.json", ("entry 0", "leaves the data folder")),
    ("NUL byte in a path", "pairs_nul_byte.json", ("entry 0", "cannot be used")),
    ("path that is not a string", "pairs_path_not_string.json", ("entry 0", "relative path string")),
    ("pair naming a missing file", "pairs_missing_file.json", ("entry 0", "nothere.png", "not found")),
    ("pair file not a list", "pairs_not_a_list.json", ("dpo_annotations.json", "non-empty list")),
    ("empty pair list", "pairs_empty_list.json", ("dpo_annotations.json", "non-empty list")),
    ("pair entry not an object", "pairs_entry_not_object.json", ("entry 0", "not an object")),
    ("truncated JSON", "pairs_truncated.json", ("dpo_annotations.json", "not valid JSON")),
    ("pair file not UTF-8", "pairs_not_utf8.json", ("dpo_annotations.json", "not valid JSON")),
    ("no pair file", "none", ("dpo_annotations.json", "not found")),
]
CASES += [Case(label, "train", "refused", names, "pairs", arg) for label, arg, names in PAIR_CASES]

YAML_CASES = [
    ("YAML with an unknown key", "cfg_unknown_key.yaml", ("optim.learning_rate",), ""),
    ("YAML with a wrong type", "cfg_wrong_type.yaml", ("train.micro_batch_size",), ""),
    ("YAML with a python/object tag", "cfg_python_tag.yaml", ("not valid YAML", "python/object"), ""),
    ("YAML that is a list", "cfg_not_mapping.yaml", ("mapping",), ""),
    ("YAML syntax error", "cfg_bad_syntax.yaml", ("not valid YAML",), ""),
    ("YAML with loss.beta: .nan", "cfg_nan_beta.yaml", ("loss.beta",), ""),
    ("YAML with optim.lr: .inf", "cfg_inf_lr.yaml", ("optim.lr",), ""),
    ("YAML not UTF-8", "cfg_not_utf8.yaml", ("cfg_not_utf8.yaml",), ""),
]
for label, arg, names, gap in YAML_CASES:
    CASES.append(Case(label, "train", "refused", names, "yaml", arg, known_gap=gap))
# evaluate.py reads a run config only inside a training checkpoint (its config.yaml).
for label, arg, names, gap in YAML_CASES:
    if arg in ("cfg_unknown_key.yaml", "cfg_python_tag.yaml", "cfg_wrong_type.yaml", "cfg_not_utf8.yaml"):
        named = ("config.yaml",) if arg == "cfg_not_utf8.yaml" else names[:1]
        CASES.append(Case(label + " (a checkpoint's config.yaml)", "evaluate", "refused", named, "yaml", arg,
                          known_gap=gap))
CASES.append(Case("override of a wrong type (train.grad_accum=two)", "train", "refused", ("train.grad_accum",),
                  "yaml", "override"))

MODEL_CASES = [
    ("model folder that does not exist", "missing", ("does not exist",), {}),
    ("model folder without config.json", "no_config", ("no config.json",), {}),
    ("config.json that is not JSON", "config_not_json", ("config.json", "not valid JSON"), {}),
    ("config.json of another model type", "wrong_model_type", ("model_type", "llama"), {}),
    ("model folder without its modeling code", "no_modeling_code", ("modeling_sa2va_chat.py",), {}),
    ("model folder without sam2.py (imported by the modeling code)", "no_sam2_code", ("sam2.py",), {}),
    ("model folder without weights", "no_weights", ("no weights",), {}),
    ("truncated model.safetensors", "truncated_weights", ("model_truncated_weights", "SafetensorError"), {}),
    ("model folder without tokenizer files", "no_tokenizer", ("tokenizer",), {}),
    ("trust_remote_code not given", "untrusted", ("modeling_sa2va_chat.py", "trust"), {}),
]
for label, arg, names, gaps in MODEL_CASES:
    for command in ("curate", "train", "evaluate"):
        CASES.append(Case(label, command, "refused", names, "model", arg, known_gap=gaps.get(command, "")))
for command in ("curate", "train", "evaluate"):
    CASES.append(Case("output folder under a regular file", command, "refused", ("a_file",), "out", "file"))
CASES.append(Case("--compare of a truncated results.json", "evaluate --compare", "refused", ("results.json",),
                  "data", "results"))
CASES.append(Case("holdout.json not UTF-8", "evaluate", "refused", ("holdout.json",), "data", "ids_not_utf8.json"))
CASES.append(Case("--holdout-ids file not UTF-8", "curate", "refused", ("ids_not_utf8.json",), "data",
                  "ids_not_utf8.json"))


def _argv(case: Case, tmp: Path, tiny: Path, pairs: Path) -> tuple[str, list[str], bool, Path]:
    """(command, argv, model_stage, output folder) for a case; builds its folders under tmp."""
    out = tmp / "out"
    command = case.command.split()[0]
    if case.kind == "out":
        (tmp / "a_file").write_text("not a folder\n")
        out = tmp / "a_file" / "out"
    model, trust, model_stage = tiny, True, False
    if case.kind == "model":
        model = model_folder(tiny, tmp, case.arg)
        trust = case.arg != "untrusted"
        model_stage = True

    if command == "train":
        data = pairs
        cfg = ["--cfg", "tiny"]
        extra = ["max_steps=1", "train.save_every=0"]
        if case.kind == "data":
            image = case.arg if case.arg.startswith("image") else "image.png"
            chosen = case.arg if case.arg.startswith("mask") else "mask.png"
            data = pair_folder(tmp / "pairs", image=image, chosen=chosen)
        elif case.kind == "pairs":
            data = pair_folder(tmp / "pairs", pairs=case.arg)
        elif case.kind == "yaml" and case.arg != "override":
            cfg = ["--cfg", str(BAD / case.arg)]
            extra = []
        elif case.arg == "override":
            extra.append("train.grad_accum=two")
        argv = [*cfg, f"model.path={model}", f"data.root={data}", f"output_dir={out}", *extra]
        if not trust:
            argv.append("model.trust_remote_code=false")
        return command, argv, model_stage, out

    if command == "datasets":
        return command, [str(import_source(tmp / "download", case.arg)), "--out", str(out), *case.extra], False, out

    data = tmp / "data"
    if case.kind == "data" and case.arg == "no_mask":
        data_folder(data, mask=None)
    elif case.kind == "data" and case.arg == "dup_stem":
        data_folder(data)
        shutil.copyfile(BAD / "image.jpg", data / "images" / "a.jpg")
    elif case.kind == "data" and case.arg.startswith("image"):
        data_folder(data, image=case.arg)
    elif case.kind == "data" and case.arg.startswith("mask"):
        data_folder(data, mask=case.arg)
    else:
        data_folder(data)
    if case.arg == "ids_not_utf8.json":
        shutil.copyfile(BAD / case.arg, data / "holdout.json" if command == "evaluate" else tmp / case.arg)

    if command == "evaluate":
        if case.arg == "results":
            good = tmp / "good.json"
            good.write_text(json.dumps({"per_image": {"a": {"dice": 1.0}}}))
            bad = tmp / "results.json"
            bad.write_text(good.read_text()[:20])
            return command, ["--compare", str(good), str(bad)], False, out
        if case.kind == "yaml":
            model = training_checkpoint(tmp / "ckpt", case.arg)
        argv = ["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", *case.extra]
        return command, argv + (["--trust-remote-code"] if trust else []), model_stage, out

    argv = ["--data", str(data), "--min-gap", "0.05", "--out", str(out)]
    if case.kind == "model":
        argv += ["--rejected", "model", "--model", str(model), "--device", "cpu"]
        argv += ["--trust-remote-code"] if trust else []
    else:
        argv += ["--rejected", "perturb"]
    if "--skip-bad" in case.command:
        argv.append("--skip-bad")
    if case.arg == "ids_not_utf8.json":
        argv += ["--holdout-ids", str(tmp / case.arg)]
    return command, argv, model_stage, out


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    target = os.environ.get("SA2VA_RELIABILITY_TABLE")
    if target:
        lines = ["| input | command | expected | result | held |", "|---|---|---|---|---|"]
        for o in OUTCOMES:
            lines.append(f"| {o['input']} | {o['command']} | {o['expected']} | {o['result']} | {o['held']} |")
        held = sum(o["held"] == "yes" for o in OUTCOMES)
        lines.append(f"\n{held} of {len(OUTCOMES)} held.")
        Path(target).write_text("\n".join(lines) + "\n")


def _record(case: Case, outcome: Outcome, held: bool, tmp: Path) -> None:
    message = outcome.message.replace(str(tmp), "TMP").replace(str(BAD), "tests/bad_inputs")
    message = message.replace("|", "\\|").replace("\n", " ")
    if len(message) > 150:
        message = message[:147] + "..."
    result = f"{outcome.kind}: `{message}`" if outcome.kind != "accepted" else f"accepted ({outcome.message})"
    expected = case.expect + (f" ({case.why})" if case.why else "")
    OUTCOMES.append({"input": case.input, "command": case.command, "expected": expected, "result": result,
                     "held": "yes" if held else f"**no**: {case.known_gap}"})


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.known_gap)]
                                               if c.known_gap else []) for c in CASES])
def test_bad_input(case: Case, tmp_path, tiny_model, tiny_pairs, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a YAML tag that ran os.system would leave its file here
    command, argv, model_stage, out = _argv(case, tmp_path, tiny_model, tiny_pairs)
    outcome = invoke(command, argv, monkeypatch, model_stage)
    problems = []
    if case.expect == "skipped":
        report_file = out / "curation_report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        reasons = [s["reason"] for s in report.get("skipped", [])]
        if outcome.kind != "accepted" or not reasons:
            problems.append(f"not skipped: {outcome}")
        else:
            outcome = Outcome("skipped", reasons[0])
    elif outcome.kind != case.expect:
        problems.append(f"expected {case.expect}, got {outcome.kind}: {outcome.message}")
    if case.expect in ("refused", "skipped"):
        missing = [n for n in case.names if n not in outcome.message]
        if missing:
            problems.append(f"message does not name {missing}: {outcome.message}")
        if "\n" in outcome.message:
            problems.append("message is more than one line")
    if case.expect == "refused":
        left = files_under(out)
        if left:
            problems.append(f"files left in the output folder: {left}")
        if command == "datasets":
            stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
            if stale:
                problems.append(f"the import left {stale}")
        if command == "curate":
            stale = [p.name for p in tmp_path.rglob("*") if ".curate." in p.name]
            stale += [p.name for p in (tmp_path / "data").glob("dpo_annotations.json")]
            if stale:
                problems.append(f"curation left {stale}")
    if (tmp_path / "PWNED_BY_YAML").exists():
        problems.append("the YAML tag ran code")
    _record(case, outcome, not problems, tmp_path)
    assert not problems, problems
