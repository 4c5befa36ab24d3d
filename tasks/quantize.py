"""Stage 2: load the base model in 4-bit NF4 once and save the pre-quantized checkpoint.

Training, evaluation and the registered model all load this folder with a plain
``from_pretrained``: the quantization config travels in its config.json, so nobody re-quantizes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qlora.config.schema import ModelConfig, QuantizationConfig, stable_hash
from qlora.errors import ModelError
from qlora.locks import one_writer
from qlora.models import (
    base_identity,
    check_reference,
    count_4bit_layers,
    dtype_choice,
    fix_generation_config,
    hub_commit,
    load_base,
    load_tokenizer,
)
from qlora.refs import QuantizedModel
from qlora.storage import cached, staged_dir

log = logging.getLogger("qlora.quantize")


def prepare_quantized_model(model: ModelConfig, quant: QuantizationConfig, workdir: str | Path) -> QuantizedModel:
    """Quantize ``model`` per ``quant`` and save it under a content key; reuse it if already there."""
    check_reference(model)  # a path that cannot be a model: one message before anything is hashed or loaded
    identity = base_identity(model)
    dtype, why = dtype_choice(quant)  # auto resolves per machine: a bf16 checkpoint is no hit on an AVX2-only CPU
    key = stable_hash({"base": identity, "quant": quant.model_dump(), "attn": model.attn_implementation,
                       "compute_dtype": str(dtype)})
    out = Path(workdir) / "quantized" / key
    with one_writer(workdir, "quantized"):  # concurrent runs of one base: one writes it, the others wait, then hit
        hit = cached(out, "the pre-quantized base", QuantizedModel)  # checked before it is trusted (qlora/storage.py)
        if hit is not None:
            log.info("pre-quantized checkpoint cache hit: %s", out)
            return hit

        t0 = time.perf_counter()
        m = load_base(model.name_or_path, quant, model)  # a bad model.name_or_path raises one ModelError (qlora/models.py)
        tok = load_tokenizer(model)  # saved with its pad token fixed: every later stage loads it from here
        fix_generation_config(m, tok)  # stop ids saved with the base: eval and MLflow consumers stop alike
        n4 = count_4bit_layers(m) if quant.load_in_4bit else 0
        if quant.load_in_4bit and n4 == 0:
            raise ModelError(f"model.name_or_path: '{model.name_or_path}' loaded, but no layer was quantized to 4-bit")
        ref = QuantizedModel(
            path=str(out.resolve()), base=model.name_or_path, revision=model.revision, fingerprint=key,
            footprint_bytes=int(m.get_memory_footprint()), quantized=quant.load_in_4bit,
            compute_dtype=str(dtype).removeprefix("torch."), dtype_choice=why,
            attn_implementation=model.attn_implementation,
            # A hub base: id and resolved commit, so consumers can load it from the hub (registry/consumer.py)
            hub_id=identity.get("hub_id"), commit=hub_commit(model) if "hub_id" in identity else None, quantization=quant.model_dump(),
        )
        with staged_dir(out, "the pre-quantized base") as tmp:  # a failed write (a full disk) leaves no .tmp behind
            m.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "manifest.json").write_text(ref.model_dump_json())
    log.info(
        "quantized %s: %d Linear4bit layers, %.1f MB in memory, %.1f s -> %s",
        model.name_or_path, n4, ref.footprint_bytes / 2**20, time.perf_counter() - t0, out,
    )
    return ref
