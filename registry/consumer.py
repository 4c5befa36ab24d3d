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
