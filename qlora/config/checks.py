"""Config-load checks of the training section against transformers itself: optimizer and scheduler
names, Trainer integrations, and ``train.extra_args`` against the ``TrainingArguments`` dataclass.

A typo here used to surface only when the train stage built its ``TrainingArguments``, after
tokenize and quantize had run (minutes to hours on a real model). Importing transformers' training
module imports torch (about 6 s here), so a value equal to the config default, which a test checks
against the same enums (tests/unit/qlora/test_config.py), is taken as is: loading a default config stays fast.
"""

from __future__ import annotations

import difflib
from typing import Any

# TrainingArguments fields the pipeline sets itself; value: what to do instead.
RESERVED = {
    "output_dir": "the run directory is workdir/runs/<content key>; set workdir",
    "report_to": "set train.report_to",
    "logging_nan_inf_filter": "the divergence guard needs every non-finite loss (always false)",
    "activation_checkpointing": "set train.gradient_checkpointing",
    "gradient_checkpointing": "set train.gradient_checkpointing",
    "train_sampling_strategy": "set train.group_by_length",
    "use_cpu": "chosen from the machine: CUDA when available",
}


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_train_field(field: str, value, default, own_fields: set[str]):
    """The TrainConfig field ``field``: defaults pass as they are (see the module docstring)."""
    if value == default:
        return value
    if field == "report_to":
        return check_report_to(value)
    if field == "extra_args":
        return check_extra_args(value, own_fields)
    return check_trainer_choice(field, value)


def check_trainer_choice(field: str, value: str) -> str:
    """``optim`` against transformers' OptimizerNames, ``lr_scheduler_type`` against SchedulerType."""
    if field == "optim":
        if value == "auto":  # resolved at training time (tasks/training/recipe.py: resolve_optim)
            return value
        from transformers.training_args import OptimizerNames as choices
    else:
        from transformers.trainer_utils import SchedulerType as choices
    names = [c.value for c in choices]
    if value not in names:
        raise ValueError(f"unknown {field} '{value}'{_suggest(value, names)}; transformers knows {', '.join(names)}")
    return value


def check_report_to(value: list[str]) -> list[str]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if "mlflow" in value or "all" in value:
        raise ValueError("MLflow is always on (the pipeline's own callback); list only other integrations, e.g. [tensorboard]")
    if unknown := [v for v in value if v not in INTEGRATION_TO_CALLBACK and v != "none"]:
        raise ValueError(f"unknown integration(s) {unknown}; transformers knows {', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
    return value


def check_extra_args(value: dict[str, Any], own_fields: set[str]) -> dict[str, Any]:
    """Names only (values are checked by TrainingArguments itself when the train stage builds it)."""
    import dataclasses

    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    problems = []
    for key in value:
        if key in own_fields:
            problems.append(f"extra_args.{key}: set train.{key} instead")
        elif key in RESERVED:
            problems.append(f"extra_args.{key}: set by the pipeline ({RESERVED[key]})")
        elif key not in known:
            problems.append(f"extra_args.{key}: not a transformers.TrainingArguments field{_suggest(key, known)}")
    if problems:
        raise ValueError("; ".join(problems))
    return value
