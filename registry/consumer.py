"""Load a registered model the way a registry consumer does, and generate.

``models:/<name>@champion`` resolves through the MLflow Model Registry to the logged adapter; the
transformers flavor loads the base, applies the adapter, and formats each input with the training
prompt template before generating.

Where the base comes from: MLflow's transformers flavor can only reference a PEFT adapter's base as
a local folder (``local_base_model_path``), here the training run's pre-quantized
``.qlora/quantized/<key>``. When the base came from the hub, the logged model also records hub id,
resolved commit and quantization config (metadata ``qlora_base``), and ``load`` rebuilds the 4-bit
base from the hub at that commit (cached), so a consumer on another machine needs no shared
storage; the local folder is only the fallback when the hub cannot be reached.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from qlora.refs import ChatContract
from qlora.tracking.runs import using_tracking_uri

log = logging.getLogger("qlora.consumer")
BASE_KEY = "qlora_base"  # logged model metadata written by registry/register.py


def _with_base(model_uri: str, base_dir: Path):
    """The model loaded with ``base_dir`` as its base: a local copy of the artifact whose MLmodel points
    there (``mlflow.pyfunc.load_model`` has no base override; ``mlflow.transformers.load_model`` has one
    but returns a bare pipeline, without the prompt template and params handling consumers rely on)."""
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tempfile.mkdtemp(prefix="qlora-model-")))
    spec = Model.load(str(local))
    spec.flavors["transformers"]["local_base_model_path"] = str(base_dir)
    spec.save(str(local / "MLmodel"))
    return mlflow.pyfunc.load_model(str(local))


def load(model_uri: str, tracking_uri: str | None = None):
    """The pyfunc model; for a hub base, with the base rebuilt from the hub at the recorded commit. ``tracking_uri``:
    the registry to resolve ``models:/`` in, for this call only (the caller's MLflow settings are left as they were)."""
    with using_tracking_uri(tracking_uri):
        return _load(model_uri)


def _load(model_uri: str):
    import mlflow

    base = (mlflow.models.Model.load(model_uri).metadata or {}).get(BASE_KEY) or {}
    if base.get("hub_id") and base.get("commit"):
        from qlora.config.schema import QuantizationConfig
        from qlora.errors import ModelError
        from qlora.models import hub_base

        try:
            built = hub_base(base["hub_id"], base["commit"], QuantizationConfig(**base.get("quantization") or {}),
                             base.get("attn_implementation", "sdpa"))
        except (OSError, ModelError) as e:  # offline, hub down, revoked token: the training machine's copy may still be there
            log.warning("cannot load the base %s@%s from the hub (%s); falling back to the local copy %s",
                        base["hub_id"], base["commit"][:12], str(e).splitlines()[0][:200], base.get("local_path"))
        else:
            return _with_base(model_uri, built)
    return mlflow.pyfunc.load_model(model_uri)


def generation_params(max_new_tokens: int = 64, temperature: float = 0.0, top_p: float | None = None,
                      top_k: int | None = None, repetition_penalty: float | None = None,
                      stop: str | None = None) -> dict:
    """predict() params: greedy at temperature 0, sampling above. The ``stop`` string travels as
    ``stop_sequence``, the name MLflow's text-generation pipeline turns into generate's stop strings
    (MLflow passes params through unchanged: a ``stop`` key would reach generate() and be refused)."""
    params: dict = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        params["temperature"] = temperature
    extra = {"top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty, "stop_sequence": stop}
    return params | {k: v for k, v in extra.items() if v is not None}


def requests(inputs: list, chat: ChatContract | None, system: str | None = None, where: str = "input") -> list:
    """What ``model.predict`` is sent for ``inputs``: each a bare string or a conversation ([{role, content}, ...]).
    A chat version gets ``{"messages": ...}`` per input (a string is one user turn; ``system`` goes in front of
    a conversation that has none); a version that takes bare prompts (the demo) gets the strings."""
    from registry.chat import ConversationError, turns_of

    if chat is None:
        if system is not None or not all(isinstance(i, str) for i in inputs):
            raise ConversationError("this version takes bare prompts (it was trained on instruction data with the built-in "
                                    "template), not conversations or a system prompt: send the user message alone")
        return list(inputs)
    out = []
    for i, item in enumerate(inputs):
        turns = turns_of(item, f"{where} {i}")
        if system is not None:
            if turns[0][0] == "system":
                raise ConversationError(f"{where} {i} has a system turn already; leave out the separate system prompt")
            turns = [("system", system)] + turns
        out.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    return out


def predict(model_uri: str, prompts: list, max_new_tokens: int = 64, temperature: float = 0.0,
            tracking_uri: str | None = None, system: str | None = None, **params) -> list[str]:
    """Generated text only (no prompt) for each input: a raw user message, or for a chat version also a
    conversation ``[{"role": ..., "content": ...}, ...]`` ending with a user turn; ``system``: a system prompt
    for inputs that bring none (else a chat version applies its default, if the training data had one);
    ``params``: top_p, top_k, repetition_penalty, stop (see ``generation_params``). ``tracking_uri``: the registry
    to resolve ``models:/`` in, for this call only."""
    from registry.chat import contract_of

    with using_tracking_uri(tracking_uri):  # the contract is the version's metadata, in that store (found by make chaos)
        sent = requests(prompts, contract_of(model_uri), system)
        model = _load(model_uri)
    return generate(model, sent, generation_params(max_new_tokens, temperature, **params))


def generate(model, inputs: list, params: dict) -> list[str]:
    """Generated text only for each input (a raw user message, or ``{"messages": ...}`` for a chat version: see
    ``requests``), from a model ``load`` returned (loaded once, called per batch)."""
    return [str(o).strip() for o in model.predict(list(inputs), params=params)]


def check_rows(samples: list[dict], k: int, chat: ChatContract | None = None) -> list[tuple]:
    """The first ``k`` eval samples a consumer could send, as (what the consumer sends, the sample).

    A chat version is sent each row's whole conversation before the scored answer (system and earlier turns
    included), as its consumers send it; so every eval row is comparable. A version that takes bare prompts
    is sent the user message of rows whose prompt is that message alone (every row of instruction data)."""
    if chat is not None:
        return [(json.loads(s["conversation"]), s) for s in samples if s.get("conversation")][:k]
    return [(s["message"], s) for s in samples if s.get("standalone") and s.get("message")][:k]


def consumer_check(name: str, version: str, rows: list[tuple], references: list[str], max_new_tokens: int,
                   tracking_uri: str, chat: ChatContract | None = None) -> list[str]:
    """Generate greedily through ``models:/<name>/<version>`` on ``rows`` (``check_rows``); the mismatches with
    ``references``: what the evaluated model answered each row's prompt as evaluation rendered it, one prompt at
    a time as a consumer's pipeline generates (``registry.register.evaluated_answers``). Same model, same prompt,
    same shapes, greedy: any difference means the registered artifact is not what was evaluated (wrong base, lost
    template, tokenizer drift), so consumers would get another model. Evaluation's own batched answers are not the
    reference: with bf16 kernels (AMX CPUs, GPUs) a batch's padding flips near-ties, and a correct artifact failed
    the check that way (measured on the tiny family models: 2 of 4 on a Xeon with AMX)."""
    got = predict(f"models:/{name}/{version}", [m for m, _ in rows], max_new_tokens=max_new_tokens,
                  tracking_uri=tracking_uri)
    return [f"{'conversation' if chat else 'prompt'} {m!r}: the evaluated model generated {want!r}, the registered "
            f"model {g!r}" for (m, _), want, g in zip(rows, references, got) if g != want]
