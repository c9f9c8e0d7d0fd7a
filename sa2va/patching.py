"""Strip gradient-blocking decorators from a Sa2VA `sam2.py`, by syntax, not by line number.

The release's `sam2.py` decorates five functions with `@torch.no_grad()` or
`@torch.inference_mode()`; any gradient that passes through them is silently cut. This module
finds such decorators with `ast` (so every spelling is recognised: aliases, by-name imports,
no parentheses, `torch.autograd.*`, keyword arguments) and removes exactly the source lines
each one occupies (found with `tokenize`, so multi-line decorators, backslash continuations,
comments and CRLF line endings are handled). Every other byte of the file is left as it was.

`@torch.inference_mode(False)` turns grad mode *on*, so it is reported and kept.
"""

from __future__ import annotations

import ast
import difflib
import io
import os
import tokenize
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fileio import atomic_path

# Fully qualified names of the context managers that disable gradients when used as decorators.
_NO_GRAD = {"torch.no_grad", "torch.autograd.no_grad", "torch.autograd.grad_mode.no_grad"}
_INFERENCE = {
    "torch.inference_mode",
    "torch.autograd.inference_mode",
    "torch.autograd.grad_mode.inference_mode",
}
_TORCH_MODULES = {"torch", "torch.autograd", "torch.autograd.grad_mode"}

# A file that defines none of these classes is not the Sa2VA release's sam2.py.
SA2VA_SAM2_CLASSES = ("SAM2Base", "SAM2VideoPredictor", "PositionEmbeddingSine")

BACKUP_SUFFIX = ".orig"


@dataclass(frozen=True)
class Found:
    """One gradient decorator on a function.

    qualname: `Class.method` (nested classes `Outer.Inner.method`, functions inside functions
    `outer.<locals>.inner`); lineno / end_lineno: 1-based lines the decorator occupies
    (from its `@` to its end); text: the decorator as `@...` on one line; span: (start, end)
    character offsets in the source of the whole lines that stripping removes; kind:
    "no_grad" or "inference_mode"; strip: False for decorators that are kept (note says why).
    """

    qualname: str
    lineno: int
    end_lineno: int
    text: str
    span: tuple[int, int]
    kind: str
    strip: bool = True
    note: str = ""


# ----------------------------------------------------------------------------- analysis


def _split_lines(source: str) -> list[str]:
    """Lines with their endings, split the way Python's tokenizer does (\\n, \\r\\n, \\r)."""
    return io.StringIO(source, newline="").readlines()


def _torch_bindings(tree: ast.AST) -> tuple[dict[str, str], dict[str, str]]:
    """Names bound by imports anywhere in the file.

    Returns (modules, objects): modules maps a local name to the torch module it stands for
    (`th` -> `torch`, `ag` -> `torch.autograd`); objects maps a local name to the qualified
    name of an imported object (`ng` -> `torch.no_grad`).
    """
    modules: dict[str, str] = {"torch": "torch"}
    objects: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname is None:
                    # `import torch.autograd` binds `torch`; attribute access resolves the rest.
                    if alias.name.split(".")[0] == "torch":
                        modules["torch"] = "torch"
                elif alias.name in _TORCH_MODULES:
                    modules[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                local = alias.asname or alias.name
                full = f"{node.module}.{alias.name}"
                if full in _TORCH_MODULES:
                    modules[local] = full
                elif node.module in _TORCH_MODULES and alias.name == "*":
                    # `from torch import *` binds no_grad and inference_mode by name
                    for name in ("no_grad", "inference_mode"):
                        objects.setdefault(name, f"{node.module}.{name}")
                elif node.module in _TORCH_MODULES:
                    objects[local] = full
    return modules, objects


def _qualified(expr: ast.expr, modules: dict[str, str], objects: dict[str, str]) -> str | None:
    """The qualified name an expression like `th.autograd.no_grad` refers to, if known."""
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    parts.reverse()
    if expr.id in objects and not parts:
        return objects[expr.id]
    if expr.id in modules:
        return ".".join([modules[expr.id], *parts])
    return None


def _classify(dec: ast.expr, modules: dict[str, str], objects: dict[str, str]) -> tuple[str, bool, str] | None:
    """(kind, strip, note) for a gradient decorator, None for any other decorator."""
    target = dec.func if isinstance(dec, ast.Call) else dec
    name = _qualified(target, modules, objects)
    if name in _NO_GRAD:
        return "no_grad", True, ""
    if name not in _INFERENCE:
        return None
    if not isinstance(dec, ast.Call):
        return "inference_mode", True, ""
    mode_args = list(dec.args[:1]) + [kw.value for kw in dec.keywords if kw.arg == "mode"]
    if not mode_args:
        return "inference_mode", True, ""
    mode = mode_args[0]
    if isinstance(mode, ast.Constant):
        if mode.value:
            return "inference_mode", True, ""
        return "inference_mode", False, "kept: inference_mode(False) enables gradients"
    return "inference_mode", False, "kept: its mode is not a constant; check it by hand"


def _decorator_lines(source: str) -> list[tuple[int, int]]:
    """(first_line, last_line) of every decorator statement: its `@` to its NEWLINE token."""
    result: list[tuple[int, int]] = []
    at_line: int | None = None
    line_start = True  # the next significant token begins a logical line
    tokens = tokenize.generate_tokens(io.StringIO(source, newline="").readline)
    for tok in tokens:
        if tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
            continue
        if tok.type == tokenize.NEWLINE:
            if at_line is not None:
                result.append((at_line, tok.start[0]))
                at_line = None
            line_start = True
            continue
        if line_start and tok.type == tokenize.OP and tok.string == "@":
            at_line = tok.start[0]
        line_start = False
    return result


def parse_source(source: str, filename: str = "<source>") -> ast.Module:
    """Parse Python source; a syntax error becomes a UserError naming the file and line."""
    try:
        return ast.parse(source, filename=filename)
    except SyntaxError as err:
        where = f"line {err.lineno}" if err.lineno else "unknown line"
        raise UserError(f"{filename} is not valid Python ({where}: {err.msg}); nothing was changed") from err
    except ValueError as err:  # e.g. null bytes
        raise UserError(f"{filename} is not a Python source file ({err}); nothing was changed") from err


def find_grad_decorators(source: str, filename: str = "<source>", include_kept: bool = False) -> list[Found]:
    """Every `no_grad` / `inference_mode` decorator on a function (methods and async defs too).

    Decorators of classes and `with torch.no_grad():` blocks are not reported. With
    include_kept, decorators that are left in place (`inference_mode(False)`) are listed too,
    with strip=False and a note.
    """
    tree = parse_source(source, filename)
    modules, objects = _torch_bindings(tree)
    lines = _split_lines(source)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    statements = _decorator_lines(source)
    found: list[Found] = []

    def statement_of(lineno: int) -> tuple[int, int]:
        for first, last in statements:
            if first <= lineno <= last:
                return first, last
        raise AssertionError(f"{filename}: no decorator statement covers line {lineno}")  # pragma: no cover

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = ".".join([*scope, child.name])
                for dec in child.decorator_list:
                    kind = _classify(dec, modules, objects)
                    if kind is None:
                        continue
                    first, last = statement_of(dec.lineno)
                    item = Found(
                        qualname=qualname,
                        lineno=first,
                        end_lineno=last,
                        text="@" + ast.unparse(dec),
                        span=(offsets[first - 1], offsets[last]),
                        kind=kind[0],
                        strip=kind[1],
                        note=kind[2],
                    )
                    if item.strip or include_kept:
                        found.append(item)
                visit(child, [*scope, child.name, "<locals>"])
            elif isinstance(child, ast.ClassDef):
                visit(child, [*scope, child.name])
            else:
                visit(child, scope)

    visit(tree, [])
    found.sort(key=lambda f: f.lineno)
    return found


def strip_grad_decorators(source: str, filename: str = "<source>") -> tuple[str, list[Found]]:
    """Remove the lines of every strippable gradient decorator; all other text is unchanged.

    Returns (new_source, stripped). The result is parsed again to prove it is valid Python.
    """
    found = find_grad_decorators(source, filename)
    pieces: list[str] = []
    pos = 0
    for item in found:
        start, end = item.span
        pieces.append(source[pos:start])
        pos = end
    pieces.append(source[pos:])
    result = "".join(pieces)
    if found:
        try:
            ast.parse(result, filename=filename)
        except SyntaxError as err:  # pragma: no cover - would be a bug in this module
            raise UserError(f"{filename}: stripping produced invalid Python at line {err.lineno}; "
                            "nothing was changed (please report this file)") from err
    return result, found


def defines_sa2va_classes(source: str, filename: str = "<source>") -> bool:
    """True if the source defines a class that only the Sa2VA/SAM2 `sam2.py` defines."""
    tree = parse_source(source, filename)
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    return any(name in names for name in SA2VA_SAM2_CLASSES)


def unified_diff(old: str, new: str, path: str) -> str:
    return "".join(difflib.unified_diff(_split_lines(old), _split_lines(new), f"a/{path}", f"b/{path}"))


# ----------------------------------------------------------------------------- files


@dataclass
class SourceFile:
    path: Path
    raw: bytes
    text: str
    encoding: str


def resolve_target(target: str | os.PathLike) -> Path:
    """A model folder (its sam2.py) or the path of a sam2.py file itself."""
    path = Path(target)
    if path.is_dir():
        candidate = path / "sam2.py"
        if not candidate.is_file():
            pys = sorted(p.name for p in path.glob("*.py"))
            listing = f" (its .py files: {', '.join(pys)})" if pys else " (it holds no .py files)"
            raise UserError(f"{path} holds no sam2.py{listing}; pass a Sa2VA model folder or the sam2.py file")
        return candidate
    if path.is_file():
        return path
    raise UserError(f"{path} does not exist; pass a Sa2VA model folder or the path of its sam2.py")


def read_source(path: Path) -> SourceFile:
    """Read bytes and decode them with the file's declared encoding, line endings untouched."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from err
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        text = raw.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a Python source file (cannot decode it: {err}); nothing was changed") from err
    if text.encode(encoding) != raw:  # pragma: no cover - exotic encodings only
        raise UserError(f"{path}: its encoding {encoding} does not round-trip; nothing was changed")
    return SourceFile(path=path, raw=raw, text=text, encoding=encoding)


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def write_preserving_mode(path: Path, data: bytes, mode_from: Path | None = None) -> None:
    """Write bytes atomically (temp file + rename) with the permission bits of `mode_from`."""
    source = mode_from if mode_from is not None and mode_from.exists() else (path if path.exists() else None)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
            if source is not None:
                os.chmod(tmp, source.stat().st_mode & 0o7777)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from err


@dataclass
class PatchResult:
    path: Path
    stripped: list[Found]
    kept: list[Found]
    old: str
    new: str
    encoding: str = "utf-8"
    raw: bytes = b""
    backup: Path | None = None
    backup_note: str = ""
    written: bool = False


def check_sa2va(src: SourceFile, force: bool) -> None:
    if not force and not defines_sa2va_classes(src.text, str(src.path)):
        raise UserError(
            f"{src.path} does not look like Sa2VA's sam2.py (it defines none of "
            f"{', '.join(SA2VA_SAM2_CLASSES)}); nothing was changed. Pass --force to patch it anyway"
        )


def analyse_file(path: Path, force: bool = False) -> PatchResult:
    """Read, refuse non-Python / non-Sa2VA files, and compute the patched text (writes nothing)."""
    src = read_source(path)
    parse_source(src.text, str(path))
    check_sa2va(src, force)
    new, stripped = strip_grad_decorators(src.text, str(path))
    kept = [f for f in find_grad_decorators(src.text, str(path), include_kept=True) if not f.strip]
    return PatchResult(path=path, stripped=stripped, kept=kept, old=src.text, new=new,
                       encoding=src.encoding, raw=src.raw)


def patch_file(path: Path, force: bool = False, dry_run: bool = False) -> PatchResult:
    """Strip the decorators in place, keeping a one-time backup `<name>.orig`.

    The backup is the file as it was before the first patch and is never overwritten. If a
    backup exists that is neither this file nor a file that patches to this file's result
    (the file was replaced by another version since), it is still kept and the note says so.
    """
    result = analyse_file(path, force)
    if not result.stripped or dry_run:
        return result
    backup = backup_path(path)
    if backup.exists():
        existing = read_source(backup)
        same_origin = existing.raw == result.raw
        if not same_origin:
            try:
                same_origin = strip_grad_decorators(existing.text, str(backup))[0] == result.new
            except UserError:
                same_origin = False
        if not same_origin:
            result.backup_note = (
                f"{backup.name} already exists and holds a different version of this file; it was kept "
                f"unchanged, so --revert would restore that older version, not the file patched now"
            )
    else:
        write_preserving_mode(backup, result.raw, mode_from=path)
    result.backup = backup
    write_preserving_mode(path, result.new.encode(result.encoding), mode_from=path)
    result.written = True
    return result


def revert_file(path: Path, force: bool = False) -> Path:
    """Restore `<name>.orig` over the file, byte for byte. Returns the backup's path.

    Refuses (unless force) when the current file is neither the backup nor its patched form,
    since restoring would then discard changes this tool did not make.
    """
    backup = backup_path(path)
    if not backup.is_file():
        raise UserError(f"no backup {backup} to revert to (it is written by the first patch of {path.name})")
    original = read_source(backup)
    if path.exists() and not force:
        current = path.read_bytes()
        if current != original.raw:
            try:
                patched = strip_grad_decorators(original.text, str(backup))[0].encode(original.encoding)
            except UserError:
                patched = None
            if current != patched:
                raise UserError(
                    f"{path} has changed since {backup.name} was written (it is not the backup with the "
                    f"decorators stripped); reverting would lose those changes. Pass --force to revert anyway"
                )
    write_preserving_mode(path, original.raw, mode_from=path if path.exists() else backup)
    return backup
