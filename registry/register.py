"""Stage 5: log the adapter to MLflow, register a version, and set the aliases consumers rely on.

``challenger`` always points at the newest version. ``champion`` moves to it only when the
promotion gate (``registry.gate``: paired bootstrap CI against the champion, or the base when there
is none) passes and the version, loaded through the registry as a consumer loads it, reproduces the
evaluation's outputs. Every version carries lineage tags and a Markdown description
(``registry.lineage``).

Registering is idempotent per MLflow run: a retried or re-run register task finds its version.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version as pkg_version

from qlora.config.schema import GENERATION_METRICS, RegistryConfig
from qlora.errors import ModelError
from qlora.models import GENERATION_DEFAULTS, ModelCache, generate, tuned
from qlora.refs import Adapter, ChatContract, EvalReport, MlflowRun, QuantizedModel, RegisteredVersion, TokenizedData
from qlora.template import PROMPT_TEMPLATE
from qlora.tracking.names import filter_literal
from qlora.tracking.runs import active_run
from registry import aliases
from registry.aliases import CHALLENGER, CHAMPION
from registry.chat import log_model
from registry.consumer import BASE_KEY, check_rows, consumer_check
from registry.gate import Decision, decide, eval_set_fingerprint, gate_metric, log_scores, stored_scores
from registry.lineage import description, lineage_tags
from registry.merged import merged_name, register_merged

log = logging.getLogger("qlora.register")
# The params a consumer may send (predict(..., params={...})). MLflow fills every param a call leaves out
# with its default here, so the defaults are evaluation's greedy decoding (qlora.models.GENERATION_DEFAULTS).
# One stop string goes as ``stop_sequence``: the text-generation pipeline's name, which it hands to generate()
# as stop_strings. MLflow forwards params unchanged, so a ``stop`` key would reach generate() and be refused;
# and it is a single string because a list param needs a list default, and an empty stop list makes
# generate() fail on every call.
STOP_PARAM = "stop_sequence"
# Passed explicitly: MLflow's inference otherwise imports torchvision, which is not installed (and not needed) here.
CONSUMER_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors")


class ConsumerCheckError(ModelError):
    """The registered version, loaded as a consumer loads it, does not reproduce the evaluation (or no eval
    prompt could be compared).

    Not retried: registering again would produce the same artifact (and another version).
    """


def pip_requirements() -> list[str]:
    return [f"{p}=={pkg_version(p)}" for p in CONSUMER_PACKAGES]


def example_of(samples: list[dict], chat: ChatContract | None = None) -> tuple[str | list[dict], str]:
    """(what a consumer sends, tuned output) for the first eval row: this run's own data is the logged input
    example and the signature's source. A chat version: the row's conversation; else the user message of the
    first row a consumer could send as is."""
    if chat is not None:
        s = next((s for s in samples if s.get("conversation")), None)
        if s is not None:
            return json.loads(s["conversation"]), s["tuned"]
    usable = [s for s in samples if s.get("message")]
    s = next((s for s in usable if s.get("standalone")), usable[0] if usable else samples[0])
    message = s.get("message") or s["prompt"]
    return ([{"role": "user", "content": message}] if chat is not None else message), s["tuned"]


def consumer_log_kwargs(prompt_template: str = PROMPT_TEMPLATE, example: tuple[str | list[dict], str] = ("", "")) -> dict:
    """What every logged model shares so consumers call it alike: template, signature, example, requirements.
    A conversation as the example makes the conversation contract (``registry/chat.py``): its signature is
    ``{"messages": [{role, content}]}`` and the chat loader renders prompts, so no prompt template."""
    import mlflow

    sent, output = example
    chat = not isinstance(sent, str)
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    model_input = {"messages": sent} if chat else [sent]
    inferred = mlflow.models.infer_signature(model_input=model_input, model_output=[output], params=GENERATION_DEFAULTS)
    params = ParamSchema(inferred.params.params + [ParamSpec(STOP_PARAM, "string", None)])  # None: no stop string
    signature = ModelSignature(inputs=inferred.inputs, outputs=inferred.outputs, params=params)
    return dict(
        # the tokenize stage's, so consumers prompt as training did (a chat version renders each conversation)
        prompt_template=None if chat else prompt_template,
        pip_requirements=pip_requirements(),
        signature=signature,
        # What a consumer sends + params (MLflow also checks it round-trips for serving): the user message, or
        # a real conversation of this run's eval rows.
        input_example=(model_input, {"max_new_tokens": 8}),
        # return_full_text: MLflow turns it off itself only when there is a prompt template
        model_config=dict(GENERATION_DEFAULTS) | ({"return_full_text": False} if chat else {}),
    )


def base_metadata(base: QuantizedModel) -> dict:
    """Where consumers get the base (registry/consumer.py): the hub at the resolved commit, else the local copy."""
    return {BASE_KEY: {"hub_id": base.hub_id, "commit": base.commit, "revision": base.revision, "local_path": base.path,
                       "quantization": base.quantization, "attn_implementation": base.attn_implementation}}


def log_adapter(base: QuantizedModel, adapter: Adapter, run: MlflowRun, prompt_template: str = PROMPT_TEMPLATE,
                models: ModelCache | None = None, example: tuple[str | list[dict], str] = ("", ""),
                chat: ChatContract | None = None):
    """Log base-referenced PEFT adapter + tokenizer with the training prompt template (a chat version: the
    conversation contract); returns ModelInfo. ``models`` holds the pair the evaluate stage loaded (same
    process); it is released afterwards."""
    model, tok = tuned(base, adapter, models)
    try:
        with active_run(run):
            return log_model(
                "model", chat,
                transformers_model={"model": model, "tokenizer": tok},
                task="text-generation",
                # MLflow references a PEFT base only as a local folder: the pre-quantized one stage 2 wrote.
                # A hub base is recorded in the metadata too, and consumers load it from there first.
                base_model_path=base.path,
                metadata=base_metadata(base),
                **consumer_log_kwargs(prompt_template, example),
            )
    finally:
        del model
        if models is not None:
            models.release()


def evaluated_answers(base: QuantizedModel, adapter: Adapter, models: ModelCache | None, rows: list[tuple],
                      max_new_tokens: int) -> list[str]:
    """The consumer check's references: what the evaluated pair (the evaluate stage's, when ``models`` holds it)
    answers each row's prompt, as evaluation rendered it, one prompt at a time as a consumer's pipeline generates."""
    if not rows:
        return []
    model, tok = tuned(base, adapter, models)
    try:
        answers = generate(model, tok, [s["prompt"] for _, s in rows], max_new_tokens, batch_size=1)
    finally:
        del model
    for (_, s), answer in zip(rows, answers):
        if answer != s["tuned"]:
            log.info("consumer check: one prompt at a time the evaluated model answers %r where evaluation's batch "
                     "answered %r (batch-dependent numerics, not a fault); the check compares the former", answer, s["tuned"])
    return answers


def gate(client, report: EvalReport, cfg: RegistryConfig, run: MlflowRun) -> Decision:
    """Store this version's per-example scores, then compare them with the champion's (or the base's) on
    ``registry.gate_metric``."""
    metric = gate_metric(cfg.gate_metric, report.samples)
    eval_set = eval_set_fingerprint(report.samples)
    scored = [m for m in GENERATION_METRICS if f"tuned_{m}" in report.samples[0]]
    log_scores(client, run.run_id, eval_set, {m: [float(s[f"tuned_{m}"]) for s in report.samples] for m in scored})
    tuned_scores = [float(s[f"tuned_{metric}"]) for s in report.samples]
    champ = aliases.current(client, cfg.model_name, CHAMPION)
    if champ is None:
        incumbent, against = [float(s[f"base_{metric}"]) for s in report.samples], "base"
    else:
        incumbent = stored_scores(champ.run_id, eval_set, run.tracking_uri, metric)
        against = f"champion v{champ.version}"
    return decide(tuned_scores, incumbent, against, cfg, eval_set, metric)


def record(client, name: str, version: str, base: QuantizedModel, adapter: Adapter, report: EvalReport,
           run: MlflowRun, decision: Decision, checked: int = 0) -> str:
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
        mlflow.log_metrics(decision.metrics() | {"gate/consumer_checked": float(checked)})
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
    chat = data.chat if data else None
    rows = check_rows(report.samples, cfg.consumer_check_prompts, chat)
    max_new = report.max_new_tokens or GENERATION_DEFAULTS["max_new_tokens"]
    # The check's references and the logged model share one loaded pair (the evaluate stage's when handed over),
    # released before the consumer check loads the registered model.
    models = models if models is not None else ModelCache()
    references = evaluated_answers(base, adapter, models, rows, max_new)
    if mv is None:
        info = log_adapter(base, adapter, run, data.prompt_template if data else PROMPT_TEMPLATE, models,
                           example_of(report.samples, chat), chat)
        mv = mlflow.register_model(info.model_uri, cfg.model_name, tags={"mlflow_run_id": run.run_id})
    else:
        models.release()
    name, version = cfg.model_name, str(mv.version)
    aliases.set_challenger(client, name, version)
    decision = gate(client, report, cfg, run)
    checked = len(rows)
    mismatches = consumer_check(name, version, rows, references, max_new, run.tracking_uri, chat) if rows else []
    if cfg.consumer_check_prompts > 0 and checked == 0:  # a check that compared nothing must not pass
        mismatches = ["no eval sample holds what a consumer sends (a conversation, or a single user message), so "
                      "nothing was compared; set registry.consumer_check_prompts=0 to skip the check"]
    if mismatches:
        decision = decision.model_copy(update={"promote": False, "reason": "consumer check failed: " + "; ".join(mismatches)})
    text = record(client, name, version, base, adapter, report, run, decision, checked)
    if publish is not None:
        publish(f"registry-{name}", text)
    if mismatches:
        raise ConsumerCheckError(f"{name} version {version} kept as challenger only: loaded through models:/{name}/{version} "
                                 f"it does not generate what the evaluated model generated: {'; '.join(mismatches)}")
    out = [CHALLENGER]
    if decision.promote and not cfg.require_approval:
        if aliases.set_champion(client, name, version, who="promotion gate", why=decision.reason) == version:
            out.append(CHAMPION)  # else a concurrent promotion landed after this one and holds the alias
    log.info("registered %s version %s (%s): %s", name, version, mv.source, decision.reason)
    if cfg.register_merged and version_of_run(client, merged_name(name), run.run_id) is None:
        template = data.prompt_template if data else PROMPT_TEMPLATE
        register_merged(base, adapter, name, version, out, run,
                        dict(consumer_log_kwargs(template, example_of(report.samples, chat)), chat=chat))
    return RegisteredVersion(name=name, version=version, model_uri=mv.source, aliases=out, decision=decision.reason,
                             awaiting_approval=decision.promote and cfg.require_approval, consumer_checked=checked)


def version_of_run(client, name: str, run_id: str):
    """The newest version of ``name`` logged from ``run_id``, or None (then it is safe to register)."""
    import mlflow

    try:
        found = client.search_model_versions(f"name = {filter_literal(name)} and run_id = {filter_literal(run_id)}")
    except mlflow.exceptions.MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
            return None
        raise
    return max(found, key=lambda mv: int(mv.version)) if found else None
