"""Stage 5: log the adapter to MLflow, register a version, and set the aliases consumers rely on.

``challenger`` always points at the newest version. ``champion`` moves to it when there is no
champion yet or when it beats the champion's tuned exact match. (A noise-aware gate replaces
that comparison in a later issue.)
"""

from __future__ import annotations

import logging
from importlib.metadata import version as pkg_version

from qlora.config import RegistryConfig
from qlora.refs import Adapter, EvalReport, MlflowRun, QuantizedModel, RegisteredVersion, TokenizedData
from qlora.template import PROMPT_TEMPLATE
from qlora.tracking import active_run

log = logging.getLogger("qlora.register")
CHAMPION, CHALLENGER = "champion", "challenger"
GATE_METRIC = "eval/tuned/exact_match"
# What a consumer needs to load the model. Passed explicitly: MLflow's inference otherwise imports
# torchvision, which is not installed (and not needed) here.
# Consumers may override these per call: predict([...], params={"max_new_tokens": 32}).
GENERATION_DEFAULTS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0}
CONSUMER_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors")


def pip_requirements() -> list[str]:
    return [f"{p}=={pkg_version(p)}" for p in CONSUMER_PACKAGES]


def log_adapter(base: QuantizedModel, adapter: Adapter, run: MlflowRun, prompt_template: str = PROMPT_TEMPLATE):
    """Log base-referenced PEFT adapter + tokenizer with the training prompt template; returns ModelInfo."""
    import mlflow

    from tasks.evaluate import load_tuned

    model, tok = load_tuned(base, adapter)
    signature = mlflow.models.infer_signature(
        model_input=["Reverse the order of the words.\napple river stone"],
        model_output=["stone river apple"],
        params=GENERATION_DEFAULTS,
    )
    with active_run(run):
        return mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tok},
            name="model",
            task="text-generation",
            # The pre-quantized base stays where stage 2 wrote it; only the adapter is stored.
            base_model_path=base.path,
            prompt_template=prompt_template,  # the tokenize stage's, so consumers prompt as training did
            pip_requirements=pip_requirements(),
            signature=signature,
            model_config=dict(GENERATION_DEFAULTS),
        )


def champion_score(client, name: str) -> float | None:
    """The current champion's gate metric, or None when there is no champion."""
    import mlflow

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    return client.get_run(mv.run_id).data.metrics.get(GATE_METRIC, float("-inf"))


def register_adapter(
    base: QuantizedModel, adapter: Adapter, report: EvalReport, cfg: RegistryConfig, run: MlflowRun,
    data: TokenizedData | None = None,
) -> RegisteredVersion:
    """Register the adapter under ``cfg.model_name``; set ``challenger``, and ``champion`` when it wins."""
    import mlflow

    client = mlflow.MlflowClient(run.tracking_uri)
    info = log_adapter(base, adapter, run, data.prompt_template if data else PROMPT_TEMPLATE)
    mv = mlflow.register_model(info.model_uri, cfg.model_name, tags={"mlflow_run_id": run.run_id})
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, mv.version)
    aliases = [CHALLENGER]
    current = champion_score(client, cfg.model_name)
    new = report.metrics.get(GATE_METRIC, float("-inf"))
    if current is None or new > current:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, mv.version)
        aliases.append(CHAMPION)
    decision = "promoted to champion" if CHAMPION in aliases else f"kept as challenger ({new:.3f} <= champion {current:.3f})"
    client.set_model_version_tag(cfg.model_name, mv.version, "promotion", decision)
    log.info("registered %s version %s (%s): %s", cfg.model_name, mv.version, info.model_uri, decision)
    return RegisteredVersion(name=cfg.model_name, version=str(mv.version), model_uri=info.model_uri, aliases=aliases)
