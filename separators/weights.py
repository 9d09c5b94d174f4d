"""Where weights come from: local folders, the torch hub cache, the Hugging Face cache, checksums,
the one-line "weights not found" error, and reading a weight file so that a damaged or foreign
file is a one-line error naming it (`load_checkpoint_file`, `model_file_errors`). Shared by every
adapter (what a model is lives in the adapters; which spec names which adapter lives in
separators.registry)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import yaml

from core.errors import PipelineError
from separators.base import file_checksum

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


# --------------------------------------------------------------------------------------------
# Reading weight files: every failure is one line naming the file and what it is not
# --------------------------------------------------------------------------------------------

# What reading a foreign or damaged file raises inside torch.load, a JSON / YAML reader or a
# family's own loader (torch.load alone raises UnpicklingError, EOFError, KeyError or
# RuntimeError depending on the first bytes).
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError,
               KeyError, OSError, yaml.YAMLError)

# torch.save's legacy (pre-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def why_unloadable(e: BaseException) -> str:
    """A short reason from a loader's exception (torch's run to paragraphs)."""
    text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it holds a {refused.group(1)} object, which a weights-only load refuses"
    if isinstance(e, EOFError) or re.search(r"EOF|central directory|corrupted|truncated", text):
        return "truncated or damaged file"
    if isinstance(e, pickle.UnpicklingError):
        return "not a PyTorch file"
    if isinstance(e, KeyError):
        return f"no {e.args[0]!r} entry" if e.args else "a required entry is missing"
    if isinstance(e, yaml.YAMLError):
        return f"not valid YAML: {' '.join(str(e).split())[:160]}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


def check_torch_file(path: str | Path, what: str) -> None:
    """Fail unless `path` looks like a torch.save file (zip with data.pkl, or the legacy format),
    without unpickling anything: for files a family's own loader unpickles fully (demucs)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not {what} (not a file)")
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_HEAD))
    if not head:
        raise PipelineError(f"{path}: not {what} (empty file)")
    if head.startswith(_TORCH_LEGACY_HEAD):
        return
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return
        except zipfile.BadZipFile:
            raise PipelineError(f"{path}: not {what} (truncated or damaged file)") from None
        raise PipelineError(f"{path}: not {what} (a zip archive, but not a PyTorch file)")
    raise PipelineError(f"{path}: not {what} (not a PyTorch file)")


@contextlib.contextmanager
def model_file_errors(path: str | Path, what: str):
    """Within the block, a loader's failure on `path` becomes `<path>: not <what> (<reason>)`."""
    try:
        yield
    except PipelineError:
        raise
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.EIO):
            raise PipelineError(f"{path}: cannot be read ({e.strerror or e})") from e
        # a damaged archive makes torch's zip reader fail with e.g. EINVAL
        raise PipelineError(f"{path}: not {what} (truncated or damaged file: {e.strerror or e})") from e
    except LOAD_ERRORS as e:
        raise PipelineError(f"{path}: not {what} ({why_unloadable(e)})") from e


def load_checkpoint_file(path: str | Path, what: str, safe_globals=()) -> Any:
    """torch.load(path, weights_only=True) on the CPU; a damaged or foreign file is a
    PipelineError naming it and what it is not ("an Open-Unmix state dict", ...).

    safe_globals: the non-tensor classes the format legitimately holds (allowed on top of
    torch's weights-only defaults, within this call only).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not {what} (not a file)")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: not {what} (empty file)")
    with model_file_errors(path, what), warnings.catch_warnings(), \
            torch.serialization.safe_globals(list(safe_globals)):
        warnings.simplefilter("ignore")   # torch warns about unusual pickle protocols, then fails
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except KeyError as e:   # the unpickler's memo: text or noise where pickle data should be
            raise pickle.UnpicklingError(f"invalid pickle data (memo key {e})") from e
