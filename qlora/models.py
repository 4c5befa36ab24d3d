"""Models: where a base comes from (a local folder or a hub id) and what a failed load of it means, the hub
token, the one quantization builder (BitsAndBytesConfig, compute dtype, device map), and every model and
tokenizer load (base, tuned adapter, merged), in that order. torch is imported where it is used, so a
hub-id check or the token does not import it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.config.schema import DEMO_BASE_DIR, ModelConfig, QuantizationConfig
from qlora.errors import ConfigError, ModelError
from qlora.refs import Adapter, QuantizedModel

if TYPE_CHECKING:
    import torch


# ------------------------------------------------------------------ secrets
def hf_token(model: ModelConfig) -> str | None:
    if model.hf_token_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(model.hf_token_secret).get()
        except ValueError as e:
            raise ConfigError(
                f"model.hf_token_secret: no Prefect Secret block named '{model.hf_token_secret}' "
                "(create it with `prefect block create secret` or unset the key to use $HF_TOKEN)"
            ) from e
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


# ------------------------------------------------------------------ quant
quant_log = logging.getLogger("qlora.quant")


def compute_dtype(cfg: QuantizationConfig) -> torch.dtype:
    """The dtype of the 4-bit matmuls: what the config names, or for ``auto`` the faster one here."""

    return dtype_choice(cfg)[0]


def dtype_choice(cfg: QuantizationConfig) -> tuple[torch.dtype, str]:
    """(compute dtype, why): recorded in the quantized checkpoint's lineage."""
    import torch

    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype), "set by quantization.compute_dtype"
    if cfg.quant_storage in ("bfloat16", "float16"):  # FSDP: compute in the storage dtype
        return getattr(torch, cfg.quant_storage), f"auto: the FSDP storage dtype {cfg.quant_storage}"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bf16 on a GPU that supports it (Ampere and newer)"
        return torch.float16, "auto: fp16 on a GPU without bf16 (V100, T4)"
    return cpu_compute_dtype()


@functools.lru_cache(maxsize=1)
def cpu_compute_dtype() -> tuple[torch.dtype, str]:
    """bf16 where this CPU multiplies bf16 about as fast as fp32 (native bf16: Zen 4, Sapphire Rapids), else fp32.

    Decided by timing, not by flags: what matters is the kernel torch and oneDNN dispatch here. Where
    bf16 is emulated, as on AVX2-only CPUs (``torch.backends.cpu.get_cpu_capability()`` == "AVX2"), a bf16
    matmul measured 130x the fp32 time and the demo trained 5-7x slower than in fp32; with native bf16
    the demo trained 13% faster in bf16 (6.9 vs 6.1 steps/s on a Zen 4). The probe is a 128x512x512
    matmul per dtype, best of 15 interleaved calls after a warm-up: about 20 ms with native bf16, 0.2 s where
    it is emulated (it stops at the first slow bf16 call). bf16 is kept when within 1.25x of fp32: it halves the memory
    of activations and dequantized weights.
    """
    import time

    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    a, b = torch.randn(128, 512), torch.randn(512, 512)
    pairs = {dt: (a.to(dt), b.to(dt)) for dt in (torch.float32, torch.bfloat16)}
    for _ in range(3):
        for x, y in pairs.values():
            torch.matmul(x, y)  # warm-up: first-call dispatch, oneDNN's kernel generation, allocation

    def once(dtype) -> float:
        t0 = time.perf_counter()
        torch.matmul(*pairs[dtype])
        return time.perf_counter() - t0

    # Interleaved and best-of: a busy machine (another run, a test suite) slows single calls of either
    # dtype, never their minimum by much; measuring one dtype after the other let a burst of load land on
    # one side only, and the choice flipped between runs on one machine (a resumed run then continued in
    # another dtype). Emulated bf16 stops after the first call that is 10x slower than fp32's best.
    fp32 = bf16 = float("inf")
    for _ in range(15):
        fp32 = min(fp32, once(torch.float32))
        bf16 = min(bf16, once(torch.bfloat16))
        if bf16 > 10 * fp32:
            break
    ratio = bf16 / max(fp32, 1e-9)
    dtype = torch.bfloat16 if ratio <= 1.25 else torch.float32
    why = (f"auto: {str(dtype).removeprefix('torch.')} on this CPU (ATen capability {cap}; a bf16 matmul took "
           f"{ratio:.2f}x the float32 time)")
    quant_log.info("quantization.compute_dtype=%s", why)
    return dtype, why


def device_map() -> dict[str, int | str]:
    """Whole model on one device. Under torchrun/accelerate each process takes its LOCAL_RANK GPU."""
    import torch

    if torch.cuda.is_available():
        import os

        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def bnb_config(cfg: QuantizationConfig):
    """The ``quantization_config`` for ``from_pretrained``, or None when 4-bit loading is off."""

    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        # uint8 packs two 4-bit values per byte; a float storage dtype (same bytes, reinterpreted) is
        # what lets FSDP flatten and shard the 4-bit weights with the rest of the model.
        bnb_4bit_quant_storage=quant_storage_dtype(cfg),
    )


def quant_storage_dtype(cfg: QuantizationConfig) -> torch.dtype:
    import torch

    return torch.uint8 if cfg.quant_storage == "auto" else getattr(torch, cfg.quant_storage)


def count_4bit_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# ------------------------------------------------------------------ source
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


# ------------------------------------------------------------------ loading
log = logging.getLogger("qlora.loading")

# How evaluation generates, and what a registry consumer gets for every parameter it does not send
# (MLflow fills a params schema's defaults into every predict call): greedy and neutral. Each key
# overrides the base's generation_config (e.g. Qwen2.5's repetition_penalty 1.05, Llama-3.1's
# do_sample=true), so evaluation and consumers decode alike whatever the base ships.
GENERATION_DEFAULTS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50,
                       "repetition_penalty": 1.0}


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of already-templated prompts, without the prompt, decoded as a registry consumer's
    pipeline decodes by default (GENERATION_DEFAULTS) and stopping where it stops: at the generation config's
    EOS ids, which this module made include the tokenizer's end-of-turn. Evaluation and generation eval batch
    (left-padded); the registry's consumer check runs one prompt at a time, as a consumer's pipeline does: with
    bf16 kernels (AMX CPUs, GPUs) a batch's padding can flip a near-tie and change a greedy answer."""
    import torch
    from tqdm.auto import tqdm

    out: list[str] = []
    # A progress bar in the terminal: generation is the slow part of evaluation (two passes: base, tuned).
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", leave=False):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, **(GENERATION_DEFAULTS | {"max_new_tokens": max_new_tokens}), pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def fix_pad_token(tok):
    """A tokenizer without a pad token (Llama-3, Mistral) pads with EOS: batches and batched generation need
    one, and the padded positions are masked (attention mask 0, labels -100), so which id it is does not matter."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def fix_generation_config(model, tok):
    """Stop where training taught the model to stop: the generation config's EOS ids plus the tokenizer's
    EOS (the end-of-turn every trained answer ends with; an instruct tokenizer's EOS is not always in its
    base config's list), and a pad id. Saved with the quantized base, so evaluation and the MLflow
    pipeline a registry consumer loads stop at the same tokens."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return model
    eos = gen.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    return model


def hub_commit(model: ModelConfig) -> str | None:
    """The commit ``model.revision`` (a branch, tag or sha; default main) resolves to on the hub, as
    transformers resolved it when loading: from the snapshot folder of the cached config.json (offline
    too, from the local hub cache). None when it cannot be told (e.g. a mirror without snapshots)."""
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    try:
        path = cached_file(model.name_or_path, "config.json", revision=model.revision, token=hf_token(model))
    except OSError:
        return None
    return extract_commit_hash(path, None) if path else None


def load_tokenizer(source: ModelConfig | str | Path, padding_side: str = "right"):
    """The tokenizer of a base (``ModelConfig``: hub id or local dir) or of a saved folder (quantized base,
    adapter), pad token fixed. ``padding_side="left"`` for batched generation."""
    from transformers import AutoTokenizer

    if isinstance(source, ModelConfig):
        with loading(source):  # a typo, an empty folder, an offline hub id: one ModelError, never retried
            tok = AutoTokenizer.from_pretrained(
                source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code,
                token=hf_token(source),
            )
    else:
        tok = AutoTokenizer.from_pretrained(str(source))
    tok = fix_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def context_length(model: ModelConfig) -> int | None:
    """Tokens the base attends over (its config's max_position_embeddings or equivalent); None when unstated."""
    from transformers import AutoConfig

    with loading(model):
        cfg = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                         trust_remote_code=model.trust_remote_code, token=hf_token(model))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(text, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(max_length: int, model: ModelConfig) -> None:
    """``data.max_length`` must fit the base's context: found when the tokenizer loads (stage 1), not after training."""
    ctx = context_length(model)
    if ctx is not None and max_length > ctx:
        raise ConfigError(
            f"data.max_length={max_length} is more than the context of model.name_or_path={model.name_or_path} "
            f"({ctx} tokens, max_position_embeddings in its config.json): set data.max_length to at most {ctx}"
        )


def load_base(path: str, quant: QuantizationConfig | None = None, model: ModelConfig | None = None,
              attn: str | None = None, fsdp: bool = False):
    """``from_pretrained`` with this project's device map and dtype; quantizes when ``quant`` asks for it.

    ``model`` carries the hub options (revision, trust_remote_code, token, attention kernel) when ``path``
    is the user's base; a pre-quantized folder needs none of them. Under FSDP no device map:
    transformers loads the weights on local rank 0 only (meta elsewhere) and FSDP shards them onto the
    GPUs (accelerate's cpu_ram_efficient_loading + sync_module_states).
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}
    if model is not None:
        kwargs = {"revision": model.revision, "trust_remote_code": model.trust_remote_code,
                  "attn_implementation": model.attn_implementation, "token": hf_token(model)}
    if quant is not None and quant.load_in_4bit:
        # Only when quantizing: an explicit None would shadow a pre-quantized checkpoint's own config.
        kwargs["quantization_config"] = bnb_config(quant)
    with loading(model) if model is not None else contextlib.nullcontext():
        return AutoModelForCausalLM.from_pretrained(
            path,
            device_map=None if fsdp else device_map(),
            dtype=compute_dtype(quant) if quant is not None else "auto",
            use_safetensors=True,  # never unpickle .bin weights
            **kwargs,
        )


def _ready_for_generation(model, tok):
    """Eval mode, and pad/EOS ids in the generation config (bases without a pad token have none)."""
    model.eval()
    return fix_generation_config(model, tok), tok


def hub_base(hub_id: str, commit: str, quant: QuantizationConfig, attn: str = "sdpa", cache: str | Path | None = None) -> Path:
    """The 4-bit base of a registered adapter rebuilt from the hub at the recorded commit, quantized
    as the quantize stage did (same function, same config: the same NF4 weights), saved once under
    ``cache`` ($QLORA_BASE_CACHE, else ~/.cache/qlora/bases). For consumers on machines without the
    training run's ``.qlora/quantized`` folder."""
    import os

    from qlora.config.schema import stable_hash
    from qlora.storage import staged_dir

    root = Path(cache or os.environ.get("QLORA_BASE_CACHE") or Path.home() / ".cache" / "qlora" / "bases")
    out = root / stable_hash({"hub_id": hub_id, "commit": commit, "quant": quant.model_dump(), "attn": attn})
    if (out / "config.json").is_file():
        return out
    cfg = ModelConfig(name_or_path=hub_id, revision=commit, attn_implementation=attn)
    model = fix_generation_config(load_base(hub_id, quant, cfg), load_tokenizer(cfg))
    with staged_dir(out, "the rebuilt 4-bit base") as tmp:  # never half-written, no .tmp left on a full disk
        model.save_pretrained(tmp, safe_serialization=True)
    log.info("rebuilt the 4-bit base %s@%s from the hub -> %s", hub_id, commit[:12], out)
    return out


def load_tuned(base: QuantizedModel, adapter: Adapter):
    """Pre-quantized base + LoRA adapter, in eval mode, with a left-padding tokenizer for batched generation."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base.path, attn=base.attn_implementation), adapter.path)
    return _ready_for_generation(model, load_tokenizer(adapter.path, padding_side="left"))


def load_merged(base: QuantizedModel, adapter: Adapter):
    """The *original* base in bf16 + the adapter, merged into plain ``nn.Linear`` weights.

    Not the 4-bit base: merging into NF4 weights would re-quantize them and lose most of what the
    adapter adds. Returns (model, tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(
        base.base, revision=base.commit or base.revision, dtype=torch.bfloat16, use_safetensors=True,
        attn_implementation=base.attn_implementation,
    )
    merged = PeftModel.from_pretrained(full, adapter.path).merge_and_unload()
    return _ready_for_generation(merged, load_tokenizer(adapter.path, padding_side="left"))


class ModelCache:
    """One loaded (base + adapter) pair, handed from the evaluate stage to the register stage when both
    run in one process (a flow run): loading the 4-bit base again costs ~1 s on the demo and about a
    minute on a 7B model. The flow owns one per run and passes it to both stages; plain calls without
    one load afresh. Keyed by the two folders, whose content keys make them immutable."""

    def __init__(self):
        self._key: tuple[str, str] | None = None
        self._pair: tuple | None = None

    def tuned(self, base: QuantizedModel, adapter: Adapter):
        key = (base.path, adapter.path)
        if self._key == key:
            log.info("reusing the tuned model loaded earlier in this run (%s + %s)", base.path, adapter.path)
            return self._pair
        self.release()
        self._pair, self._key = load_tuned(base, adapter), key
        return self._pair

    @property
    def holds(self) -> tuple[str, str] | None:
        return self._key

    def release(self) -> None:
        """Drop the kept pair (and its GPU memory)."""
        if self._pair is None:
            return
        import gc

        import torch

        self._pair, self._key = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def tuned(base: QuantizedModel, adapter: Adapter, cache: ModelCache | None = None):
    """From ``cache`` when given (kept there for the next stage), else a fresh load."""
    return cache.tuned(base, adapter) if cache is not None else load_tuned(base, adapter)
