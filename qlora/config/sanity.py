"""Config values that load but are almost certainly a mistake: warned when a run starts, not refused.

Refusing them would break legitimate experiments (the tests diverge a run on purpose with
``learning_rate=1e37``); the divergence guard in training stops a run that such a value ruins.
Values that cannot work are refused where they are known: ranges in ``qlora/config/schema.py``, the base's
context length when its tokenizer loads (``tasks/tokenize.py``).
"""

from __future__ import annotations

from qlora.config.schema import PipelineConfig

LEARNING_RATE_RANGE = (1e-6, 1e-1)  # QLoRA uses 1e-4..3e-4; full fine-tuning 1e-5..5e-5
LONG_GENERATION = 4096  # eval.max_new_tokens above this makes evaluation (two passes) very slow


def config_warnings(cfg: PipelineConfig) -> list[str]:
    out = []
    lo, hi = LEARNING_RATE_RANGE
    if not lo <= cfg.train.learning_rate <= hi:
        out.append(f"train.learning_rate={cfg.train.learning_rate:g} is far outside the usual {lo:g}..{hi:g} "
                   "(QLoRA: 1e-4..3e-4); the run is stopped if it diverges")
    if cfg.eval.max_new_tokens > LONG_GENERATION:
        out.append(f"eval.max_new_tokens={cfg.eval.max_new_tokens} generates that many tokens per eval prompt, "
                   f"twice (base and tuned) for eval.max_samples={cfg.eval.max_samples} prompts")
    if cfg.report.webhook_url and not cfg.report.webhook_secret:
        out.append("report.webhook_url is stored in this flow run's parameters (readable in the Prefect UI and API); "
                   "put the URL in a Prefect Secret block and set report.webhook_secret instead")
    return out
