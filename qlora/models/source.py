"""Where the base model comes from (a local folder or a hub id), and what a failed load of it means.

``from_pretrained`` reports a typo, an empty folder, a folder that is no model, a hub id that is not
cached while offline and a file without read permission as ``OSError``/``ValueError``, the same types
as a network blip. Retrying the first kind only repeats the failure and buries the message (issue 13,
item 4), so they become one ``ModelError`` naming ``model.name_or_path`` and what to do; a genuine
network fault keeps its type and stays transient (``qlora.errors.is_transient``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from pathlib import Path

from qlora.config.schema import DEMO_BASE_DIR, ModelConfig
from qlora.errors import ModelError

log = logging.getLogger("qlora.loading")
KEY = "model.name_or_path"
DEMO_HINT = "for the demo base run `make demo` or `qlora build-demo` first"


# A name ending so is a file someone meant to point at, not a repo (hub ids may hold dots: Llama-3.1-8B, OpenHermes-2.5).
FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".jsonl", ".ndjson", ".csv", ".parquet", ".arrow", ".txt",
                 ".yaml", ".yml", ".gguf", ".pt")


def is_hub_id(name: str, owner_required: bool = False) -> bool:
    """The one rule for data and models: an existing local path wins; otherwise huggingface_hub's own repo-id
    rule (``owner/name`` or ``name``, letters, digits, ``-``, ``_``, ``.``), not starting with a dot and not
    ending like a file. ``owner_required``: datasets need ``owner/name`` (a bare ``name`` there is far more
    often a mistyped local file than a legacy hub dataset); models accept ``gpt2``.
    Not ``Path(name).suffix``: that is '.1-8B-Instruct' for meta-llama/Llama-3.1-8B-Instruct."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).expanduser().exists() or (owner_required and name.count("/") != 1):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith(".") and not name.lower().endswith(FILE_SUFFIXES)


def _hint(name: str) -> str:
    demo = name.rstrip("/").endswith(Path(DEMO_BASE_DIR).name)
    return DEMO_HINT if demo else "point it at a model directory (config.json, tokenizer, *.safetensors) or a hub id like org/name"


def check_reference(model: ModelConfig) -> None:
    """Fail fast, before any library call, on a local path that cannot be a model."""
    name = model.name_or_path
    p = Path(name).expanduser()
    if p.is_dir():
        if not any(p.iterdir()):
            raise ModelError(f"{KEY}: '{name}' is an empty folder; {_hint(name)}")
        if not (p / "config.json").is_file():
            raise ModelError(f"{KEY}: '{name}' is a folder but not a Hugging Face model (no config.json in it); {_hint(name)}")
        for weights in sorted(p.glob("*.safetensors")):
            if (why := safetensors_problem(weights)) is not None:
                raise ModelError(f"{KEY}: {weights} {why}: an interrupted download or copy? Download or copy that file "
                                 "again (huggingface-cli download resumes), then re-run")
    elif p.exists():
        raise ModelError(f"{KEY}: '{name}' is a file; expected a model directory or a hub id like org/name")
    elif name.startswith((".", "/", "~")) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name:
        raise ModelError(f"{KEY}: '{name}' does not exist (resolved from {Path.cwd()}); {_hint(name)}")
    elif not is_hub_id(name):
        raise ModelError(f"{KEY}: '{name}' is neither an existing local directory nor a valid hub id; {_hint(name)}")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole, from its own header (8-byte length, JSON with every tensor's
    byte range), without reading the tensors: a file cut short ends before its last tensor does."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is cut short ({size} bytes, not even a header)"
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return f"is cut short ({size:,} bytes, its header alone says {8 + n:,})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"has no readable safetensors header ({type(e).__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)), default=0)
    if size < 8 + n + end:
        return f"is cut short: {size:,} of {8 + n + end:,} bytes"
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def user_error_of(model: ModelConfig, exc: BaseException) -> ModelError | None:
    """The user's mistake ``exc`` reports, as one message; None when it is a fault to retry or a bug."""
    name = model.name_or_path
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    for e in _chain(exc):
        kind = type(e).__name__
        if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM)):
            where = getattr(e, "filename", None) or name
            return ModelError(f"{KEY}: cannot read '{where}' (permission denied); make the model files readable by this user")
        if kind == "HFValidationError":
            return ModelError(f"{KEY}: '{name}' is neither an existing local directory nor a valid hub id ({first}); {_hint(name)}")
        if kind == "GatedRepoError":
            return ModelError(f"{KEY}: '{name}' is a gated hub repo; accept its terms on the hub and set $HF_TOKEN or model.hf_token_secret")
        if kind == "RevisionNotFoundError":
            return ModelError(f"model.revision: '{model.revision}' is not a branch, tag or commit of '{name}'")
        if kind == "RepositoryNotFoundError":
            return ModelError(f"{KEY}: no hub repo '{name}' (check the id; a private repo needs $HF_TOKEN or model.hf_token_secret)")
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") and _offline():
            return ModelError(
                f"{KEY}: '{name}' is not in the local hub cache and hub downloads are off (HF_HUB_OFFLINE=1): "
                f"download it first (`hf download {name}`) or point {KEY} at a local model directory"
            )
        if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            return ModelError(f"{KEY}: '{name}' lacks a file a model needs ({first})")
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return ModelError(f"{KEY}: '{name}' ships its own model code; set model.trust_remote_code: true only if you "
                          "trust that repo (its code runs in this process), ideally with model.revision pinned")
    if Path(name).expanduser().is_dir() and isinstance(exc, (OSError, ValueError, KeyError)):
        # A folder with config.json that still does not load: wrong/missing tokenizer or weights files.
        return ModelError(f"{KEY}: '{name}' does not load as a model ({first}); {_hint(name)}")
    return None


_WARNED_REMOTE_CODE: set[tuple[str, str | None]] = set()


def warn_remote_code(model: ModelConfig) -> None:
    """Before the first load that may run the repo's code (the tokenizer, in tokenize), once per process."""
    key = (model.name_or_path, model.revision)
    if model.trust_remote_code and key not in _WARNED_REMOTE_CODE:
        _WARNED_REMOTE_CODE.add(key)
        log.warning("model.trust_remote_code is on: Python code shipped in %s (revision %s) will run in this process, "
                    "with its permissions and secrets; pin model.revision to a commit you have reviewed",
                    model.name_or_path, model.revision or "unpinned")


@contextlib.contextmanager
def loading(model: ModelConfig):
    """Around a ``from_pretrained`` of the user's base: its user errors become one ``ModelError``."""
    check_reference(model)
    warn_remote_code(model)
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        err = user_error_of(model, e)
        if err is None:
            raise
        raise err from None


def base_identity(model: ModelConfig) -> dict:
    """What the base *is*: a hash of a local directory's weights, or hub id + revision."""
    p = Path(model.name_or_path)
    if p.is_dir():
        h = hashlib.sha256()
        files = sorted(f for f in p.iterdir() if f.suffix in {".safetensors", ".json", ".model"})
        if not any(f.suffix == ".safetensors" for f in files):
            raise ModelError(f"{p}: no .safetensors weights in this model directory (model.name_or_path)")
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return {"local_weights_sha256": h.hexdigest()}
    if not is_hub_id(model.name_or_path):
        raise ModelError(
            f"model.name_or_path: '{model.name_or_path}' is neither an existing local directory nor a hub id "
            "like 'org/name' (for the demo base run `make demo` or `qlora build-demo` first)"
        )
    return {"hub_id": model.name_or_path, "revision": model.revision or "main"}
