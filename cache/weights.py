"""Where weights come from: local folders, the torch hub cache, the Hugging Face cache, checksums,
and the one-line "weights not found" error. Shared by every adapter (what a model is lives in the
adapters; which spec names which adapter lives in cache.registry)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from cache.base import file_checksum
from pipeline.errors import PipelineError

# --------------------------------------------------------------------------------------------

def hub_checkpoints_dir() -> Path:
    """Where torch.hub.load_state_dict_from_url caches files: $TORCH_HOME/hub/checkpoints."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def enable_offline() -> None:
    """Make Hugging Face hub calls cache-only for the rest of the process.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, so the constant is patched as well when
    it has already been imported.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def hf_offline():
    """Hugging Face hub cache-only within the block (restored afterwards)."""
    import huggingface_hub.constants as constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def hf_cached(repo_id: str, filename: str) -> Path | None:
    """The cached file of a Hugging Face repo, or None; never touches the network."""
    import huggingface_hub.constants as constants

    # the cache layout is <HF_HUB_CACHE>/models--<owner>--<name>/; skip importing the download
    # machinery (about a second) when the repo was never cached
    if not (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


_CHECKSUMS: dict[tuple, str] = {}


def cached_checksum(path: str | Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) so a bag is hashed once per process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _CHECKSUMS:
        _CHECKSUMS[key] = file_checksum(p)
    return _CHECKSUMS[key]


def combined_checksum(parts: Any) -> str:
    """One hex digest for several files' checksums plus whatever else defines the weights."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def missing_weights_error(model: str, files: list[tuple[str, str | None]], folders: list[str],
                          extra: str = "") -> PipelineError:
    """The one-line 'weights not found' error: which files, where we looked, how to fix it.

    files: (file name, download URL or None).
    """
    names = ", ".join(f for f, _ in files)
    urls = " ".join(u for _, u in files if u)
    where = " or ".join(folders)
    msg = f"{model}: weights {names} not found in {where}"
    if urls:
        msg += f"; download {urls} on a machine with internet and put {'it' if len(files) == 1 else 'them'} in one of those folders"
    if extra:
        msg += f" ({extra})"
    return PipelineError(msg)
