"""Load a registered model the way a registry consumer does, and generate.

``models:/<name>@champion`` resolves through the MLflow Model Registry to the logged adapter; the
transformers flavor loads the referenced pre-quantized base, applies the adapter, and formats each
input with the training prompt template before generating.
"""

from __future__ import annotations


def load(model_uri: str, tracking_uri: str | None = None):
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)


def predict(model_uri: str, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
            tracking_uri: str | None = None) -> list[str]:
    """Generated text only (no prompt) for each raw user message in ``prompts``."""
    params = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        params["temperature"] = temperature
    out = load(model_uri, tracking_uri).predict(prompts, params=params)
    return [str(o).strip() for o in out]


def user_message_of(prompt: str) -> str | None:
    """Invert the template: the raw message a consumer would send, or None for a prompt not made by it alone."""
    from qlora.template import PROMPT_TEMPLATE

    head, tail = PROMPT_TEMPLATE.split("{prompt}")
    if prompt.startswith(head) and prompt.endswith(tail):
        return prompt[len(head) : len(prompt) - len(tail)]
    return None  # e.g. a ShareGPT system turn prepended to the template


def consumer_check(name: str, version: str, samples: list[dict], max_new_tokens: int, k: int,
                   tracking_uri: str) -> list[str]:
    """Generate greedily through ``models:/<name>/<version>`` on ``k`` eval prompts; mismatches with eval, if any.

    Same model, same prompts, greedy: any difference means the registered artifact is not what was
    evaluated (wrong base path, lost template, tokenizer drift), so consumers would get another model.
    """
    rows = [(m, s["tuned"]) for s in samples if (m := user_message_of(s["prompt"])) is not None][:k]
    if not rows:
        return []
    got = predict(f"models:/{name}/{version}", [m for m, _ in rows], max_new_tokens=max_new_tokens,
                  tracking_uri=tracking_uri)
    return [f"prompt {m!r}: evaluation generated {want!r}, the registered model {g!r}"
            for (m, want), g in zip(rows, got) if g != want]
