"""Stage 5: log the adapter to MLflow, register a version, and set the aliases consumers rely on.

``challenger`` always points at the newest version. ``champion`` moves to it only when the
promotion gate (``registry.gate``: paired bootstrap CI against the champion, or the base when there
is none) passes and the version, loaded through the registry as a consumer loads it, reproduces the
evaluation's outputs. Every version carries lineage tags and a Markdown description
(``registry.lineage``).
"""

from __future__ import annotations

import logging
from importlib.metadata import version as pkg_version

from qlora.config import RegistryConfig
from qlora.errors import ModelError
from qlora.loading import ModelCache, tuned
from qlora.refs import Adapter, EvalReport, MlflowRun, QuantizedModel, RegisteredVersion, TokenizedData
from qlora.template import PROMPT_TEMPLATE
from qlora.tracking import active_run
from registry import aliases
from registry.aliases import CHALLENGER, CHAMPION
from registry.consumer import consumer_check
from registry.gate import Decision, decide, eval_set_fingerprint, log_scores, stored_scores
from registry.idempotent import version_of_run
from registry.lineage import description, lineage_tags
from registry.merged import merged_name, register_merged

log = logging.getLogger("qlora.register")
# What a consumer needs to load the model. Passed explicitly: MLflow's inference otherwise imports
# torchvision, which is not installed (and not needed) here.
# Consumers may override these per call: predict([...], params={"max_new_tokens": 32}).
GENERATION_DEFAULTS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0}
EXAMPLE_PROMPT = "Reverse the order of these words: apple river stone"
CONSUMER_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors")


class ConsumerCheckError(ModelError):
    """The registered version, loaded as a consumer loads it, does not reproduce the evaluation.

    Not retried: registering again would produce the same artifact (and another version).
    """


def pip_requirements() -> list[str]:
    return [f"{p}=={pkg_version(p)}" for p in CONSUMER_PACKAGES]


def consumer_log_kwargs(prompt_template: str = PROMPT_TEMPLATE) -> dict:
    """What every logged model shares so consumers call it alike: template, signature, example, requirements."""
    import mlflow

    signature = mlflow.models.infer_signature(
        model_input=[EXAMPLE_PROMPT], model_output=["stone river apple"], params=GENERATION_DEFAULTS,
    )
    return dict(
        prompt_template=prompt_template,  # the tokenize stage's, so consumers prompt as training did
        pip_requirements=pip_requirements(),
        signature=signature,
        # Raw user message + params: what a consumer sends (MLflow also checks it round-trips for serving).
        input_example=([EXAMPLE_PROMPT], {"max_new_tokens": 8}),
        model_config=dict(GENERATION_DEFAULTS),
    )


def log_adapter(base: QuantizedModel, adapter: Adapter, run: MlflowRun, prompt_template: str = PROMPT_TEMPLATE,
                models: ModelCache | None = None):
    """Log base-referenced PEFT adapter + tokenizer with the training prompt template; returns ModelInfo.
    ``models`` holds the pair the evaluate stage loaded (same process); it is released afterwards."""
    import mlflow

    model, tok = tuned(base, adapter, models)
    try:
        with active_run(run):
            return mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tok},
                name="model",
                task="text-generation",
                # The pre-quantized base stays where stage 2 wrote it; only the adapter is stored.
                base_model_path=base.path,
                **consumer_log_kwargs(prompt_template),
            )
    finally:
        del model
        if models is not None:
            models.release()


def gate(client, report: EvalReport, cfg: RegistryConfig, run: MlflowRun) -> Decision:
    """Store this version's per-example scores, then compare them with the champion's (or the base's)."""
    tuned = [float(s["tuned_correct"]) for s in report.samples]
    eval_set = eval_set_fingerprint(report.samples)
    log_scores(client, run.run_id, eval_set, tuned)
    champ = aliases.current(client, cfg.model_name, CHAMPION)
    if champ is None:
        incumbent, against = [float(s["base_correct"]) for s in report.samples], "base"
    else:
        incumbent, against = stored_scores(champ.run_id, eval_set, run.tracking_uri), f"champion v{champ.version}"
    return decide(tuned, incumbent, against, cfg, eval_set)


def record(client, name: str, version: str, base: QuantizedModel, adapter: Adapter, report: EvalReport,
           run: MlflowRun, decision: Decision) -> str:
    """Lineage tags + Markdown description on the version, the decision in the run; returns the description."""
    import mlflow

    tags = lineage_tags(base, adapter, report, run, client.get_run(run.run_id).data.tags)
    tags |= {"promotion": "promoted to champion" if decision.promote else "kept as challenger",
             "promotion.reason": decision.reason, "promotion.evidence": decision.model_dump_json()}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v[:5000])
    text = description(name, version, tags, report, decision)
    client.update_model_version(name, version, description=text)
    with active_run(run):
        mlflow.log_metrics(decision.metrics())
    return text


def register_adapter(
    base: QuantizedModel, adapter: Adapter, report: EvalReport, cfg: RegistryConfig, run: MlflowRun,
    data: TokenizedData | None = None, models: ModelCache | None = None, publish=None,
) -> RegisteredVersion:
    """Register the adapter under ``cfg.model_name``; ``challenger`` always, ``champion`` when the gate passes.

    ``models``: the evaluate stage's loaded pair, reused for logging. ``publish(key, markdown)``: where the
    version's description also goes (the flow passes a Prefect artifact writer). Order matters: the version is registered and tagged ``challenger`` first, so a failed consumer
    check or a refused approval still leaves an inspectable version that consumers of ``champion``
    never see.
    """
    import mlflow

    client = mlflow.MlflowClient(run.tracking_uri)
    mv = version_of_run(client, cfg.model_name, run.run_id)  # a retry or re-run reuses its version (issue 4)
    if mv is None:
        info = log_adapter(base, adapter, run, data.prompt_template if data else PROMPT_TEMPLATE, models)
        mv = mlflow.register_model(info.model_uri, cfg.model_name, tags={"mlflow_run_id": run.run_id})
    name, version = cfg.model_name, str(mv.version)
    aliases.set_challenger(client, name, version)
    decision = gate(client, report, cfg, run)
    mismatches = consumer_check(name, version, report.samples, report.max_new_tokens or GENERATION_DEFAULTS["max_new_tokens"],
                                cfg.consumer_check_prompts, run.tracking_uri)
    if mismatches:
        decision = decision.model_copy(update={"promote": False, "reason": "consumer check failed: " + "; ".join(mismatches)})
    text = record(client, name, version, base, adapter, report, run, decision)
    if publish is not None:
        publish(f"registry-{name}", text)
    if mismatches:
        raise ConsumerCheckError(f"{name} version {version} kept as challenger only: loaded through models:/{name}/{version} "
                                 f"it does not generate what evaluation generated: {'; '.join(mismatches)}")
    out = [CHALLENGER]
    if decision.promote and not cfg.require_approval:
        if aliases.set_champion(client, name, version, who="promotion gate", why=decision.reason) == version:
            out.append(CHAMPION)  # else a concurrent promotion landed after this one and holds the alias
    log.info("registered %s version %s (%s): %s", name, version, mv.source, decision.reason)
    if cfg.register_merged and version_of_run(client, merged_name(name), run.run_id) is None:
        template = data.prompt_template if data else PROMPT_TEMPLATE
        register_merged(base, adapter, name, version, out, run, consumer_log_kwargs(template))
    return RegisteredVersion(name=name, version=version, model_uri=mv.source, aliases=out, decision=decision.reason,
                             awaiting_approval=decision.promote and cfg.require_approval)
