"""Strip @torch.no_grad / @torch.inference_mode decorators from a Sa2VA model's sam2.py.

    python patch_sam2.py [MODEL_DIR | path/to/sam2.py] [--check | --revert | --dry-run] [--force]

With no MODEL_DIR, the default config's model.path is used. See docs/patch_sam2.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sa2va.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from sa2va.errors import UserError, run_cli
from sa2va.patching import (
    PatchResult,
    analyse_file,
    backup_path,
    patch_file,
    resolve_target,
    revert_file,
    unified_diff,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Remove the gradient-blocking decorators (@torch.no_grad, @torch.inference_mode) "
        "from a Sa2VA model folder's sam2.py, keeping a backup sam2.py.orig.")
    parser.add_argument("model", nargs="?", metavar="MODEL_DIR",
                        help="Sa2VA model folder (or its sam2.py); default: model.path of configs/v8.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 while any such decorator remains, 0 when none")
    mode.add_argument("--revert", action="store_true", help="restore sam2.py from sam2.py.orig")
    mode.add_argument("--dry-run", action="store_true", help="print the unified diff; write nothing")
    parser.add_argument("--force", action="store_true",
                        help="patch a file that does not look like Sa2VA's sam2.py; revert over local changes")
    return parser.parse_args(argv)


def default_model_dir() -> Path:
    cfg = load_config(DEFAULT_CONFIG)
    shown_cfg = os.path.relpath(DEFAULT_CONFIG, REPO_ROOT)
    path = Path(cfg.model.path)
    if not path.exists():
        raise UserError(
            f"no model folder given and the default config's model.path ({cfg.model.path}, from {shown_cfg}) "
            f"does not exist: run `python patch_sam2.py MODEL_DIR`")
    print(f"no model folder given: using model.path of {shown_cfg}: {cfg.model.path}")
    return path


def print_found(result: PatchResult, verb: str) -> None:
    for item in result.stripped:
        print(f"  {verb} {item.qualname} (line {item.lineno}): {item.text}")
    for item in result.kept:
        print(f"  kept {item.qualname} (line {item.lineno}): {item.text} -- {item.note.removeprefix('kept: ')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = resolve_target(args.model if args.model else default_model_dir())

    if args.revert:
        backup = revert_file(target, force=args.force)
        print(f"reverted {target} from {backup.name} (byte-identical to the backup)")
        return 0

    if args.check:
        result = analyse_file(target, force=args.force)
        if result.stripped:
            print(f"{target}: {len(result.stripped)} gradient-blocking decorator(s) remain:")
            print_found(result, "found")
            print(f"run `python patch_sam2.py {args.model or target.parent}` to strip them")
            return 1
        print_found(result, "found")
        print(f"ok: {target} has no gradient-blocking decorator on any function")
        return 0

    if args.dry_run:
        result = analyse_file(target, force=args.force)
        if not result.stripped:
            print_found(result, "found")
            print(f"nothing to strip: already patched ({target}); nothing would change")
            return 0
        print(unified_diff(result.old, result.new, target.name), end="")
        print_found(result, "would strip")
        print(f"dry run: {len(result.stripped)} decorator(s) would be stripped from {target}; nothing written")
        return 0

    result = patch_file(target, force=args.force)
    if not result.written:
        print_found(result, "found")
        note = f"; backup {backup_path(target).name} kept" if backup_path(target).exists() else ""
        print(f"nothing to strip: already patched ({target} is unchanged{note})")
        return 0
    print(f"patched {target}:")
    print_found(result, "stripped")
    if result.backup_note:
        print(f"note: {result.backup_note}")
    print(f"stripped {len(result.stripped)} decorator(s) from {len(set(f.qualname for f in result.stripped))} "
          f"function(s); backup: {result.backup}; undo with `python patch_sam2.py {args.model or target.parent} --revert`")
    return 0


if __name__ == "__main__":
    run_cli(main)
