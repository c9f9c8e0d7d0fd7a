"""Model paths that are Hugging Face hub ids (`ByteDance/Sa2VA-4B`), resolved through the hub's cache.

A model path is a local folder when it exists. Otherwise, when it reads `owner/name` (two
parts, neither starting with a dot, and `owner` not a local folder), it is a hub id and is
resolved with `huggingface_hub.snapshot_download`: the cached snapshot when the hub cannot be
reached or `HF_HUB_OFFLINE=1` is set, a download into the cache when it can. The cache is
huggingface_hub's own (`HF_HUB_CACHE`, or `HF_HOME/hub`, default ~/.cache/huggingface/hub).
Neither a folder nor a cached id: one line that says where it looked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
HUB_ID = re.compile(rf"{_PART}/{_PART}")


def is_hub_id(value: str | os.PathLike) -> bool:
    """`owner/name` that is not a local path (the folder itself, or its owner part, exists)."""
    text = str(value)
    if not HUB_ID.fullmatch(text) or ".." in text or text.endswith((".yaml", ".json", ".safetensors")):
        return False
    return not Path(text).exists() and not Path(text.split("/")[0]).is_dir()


def _cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve_model_path(value: str | os.PathLike) -> Path:
    """The local folder of a model path: itself, or a hub id's snapshot in the cache."""
    if not is_hub_id(value):
        return Path(value)
    repo_id = str(value)
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as err:  # pragma: no cover - transformers depends on huggingface_hub
        raise UserError(f"model {repo_id}: no such folder, and huggingface_hub is not installed to resolve it "
                        "as a hub id") from err
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    cache = _cache_dir()
    where = f"no folder {repo_id} here, and as a Hugging Face hub id it is not in the cache {cache}"
    try:
        folder = snapshot_download(repo_id=repo_id, cache_dir=cache, local_files_only=offline)
    except LocalEntryNotFoundError as err:
        why = ("HF_HUB_OFFLINE is set, so nothing was downloaded" if offline
               else "and the hub could not be reached to download it")
        raise UserError(f"model {repo_id}: {where} ({why}); download it once with network access "
                        f"(`hf download {repo_id}`) or pass a local folder") from err
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model {repo_id}: no such folder, and the hub refused the id: {first}") from err
    except Exception as err:  # noqa: BLE001 - network, disk, a broken cache entry: one line, not a trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"model {repo_id}: cannot resolve the hub id: {type(err).__name__}: {first}") from err
    return Path(folder)
