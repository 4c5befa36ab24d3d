"""QLoRA fine-tuning pipeline: typed config, shared helpers and the CLI. Stages live in tasks/."""

__version__ = "0.1.0"
