"""The prompt template: one function for training, evaluation and the registry's consumers.

``PROMPT_TEMPLATE`` is also handed to ``mlflow.transformers.log_model(prompt_template=...)``, so a
consumer calling ``predict(["<instruction>"])`` on ``models:/<name>@champion`` gets exactly the prompt
the adapter was trained on.
"""

from __future__ import annotations

# A single ``{prompt}`` placeholder is what MLflow's prompt_template accepts.
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def user_message(instruction: str, input: str | None = None) -> str:
    """Alpaca's instruction + optional input as the one user message a consumer would send."""
    instruction = instruction.strip()
    return f"{instruction}\n{input.strip()}" if input and input.strip() else instruction


def format_prompt(message: str) -> str:
    """The exact text the model sees before its response."""
    return PROMPT_TEMPLATE.format(prompt=message)
