"""Every model and tokenizer load in one place: the base (quantizing or pre-quantized), the tuned
adapter on it, the merged full-precision model, and the tokenizer with its pad token fixed.

Stages and the registry load through these functions only, so a loading rule (safetensors only,
the device map, the pad token, left padding for generation) is written once.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from qlora.config.schema import ModelConfig, QuantizationConfig
from qlora.errors import ConfigError
from qlora.models.quant import bnb_config, compute_dtype, device_map
from qlora.models.secrets import hf_token
from qlora.models.source import loading
from qlora.refs import Adapter, QuantizedModel

log = logging.getLogger("qlora.loading")

# How evaluation generates, and what a registry consumer gets for every parameter it does not send
# (MLflow fills a params schema's defaults into every predict call): greedy and neutral. Each key
# overrides the base's generation_config (e.g. Qwen2.5's repetition_penalty 1.05, Llama-3.1's
# do_sample=true), so evaluation and consumers decode alike whatever the base ships.
GENERATION_DEFAULTS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50,
                       "repetition_penalty": 1.0}


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
