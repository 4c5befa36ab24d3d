"""``registry.register_merged``: a merged, full-precision copy for consumers without PEFT or bitsandbytes.

The adapter is merged into the *original* base loaded in bf16, not into the 4-bit one: merging into
NF4 weights would re-quantize them and throw away most of what the adapter adds. The merged model
is registered as ``<model_name>-merged`` with the same aliases the adapter version got, and each
version points at the adapter version it came from (tag ``adapter_version``).
"""

from __future__ import annotations

import logging

from qlora.models import load_merged
from qlora.refs import Adapter, MlflowRun, QuantizedModel
from qlora.tracking.runs import active_run
from registry.chat import log_model

log = logging.getLogger("qlora.register")


def merged_name(model_name: str) -> str:
    return f"{model_name}-merged"


def register_merged(base: QuantizedModel, adapter: Adapter, model_name: str, adapter_version: str,
                    aliases: list[str], run: MlflowRun, log_kwargs: dict) -> str:
    """Log and register the merged model; returns its version. ``log_kwargs`` = the adapter's log_model extras
    and its ``chat`` contract."""
    import mlflow

    model, tok = load_merged(base, adapter)
    with active_run(run):
        info = log_model("merged", transformers_model={"model": model, "tokenizer": tok}, task="text-generation",
                         save_pretrained=True, **log_kwargs)
    name = merged_name(model_name)
    mv = mlflow.register_model(info.model_uri, name, tags={"mlflow_run_id": run.run_id, "adapter_version": adapter_version})
    client = mlflow.MlflowClient(run.tracking_uri)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, mv.version)
    log.info("registered merged full-precision %s version %s (aliases %s)", name, mv.version, ",".join(aliases) or "-")
    return str(mv.version)
