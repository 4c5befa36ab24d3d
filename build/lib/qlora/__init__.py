"""The ground floor: the typed config, references passed between stages, the prompt template, model
loading, quantization, MLflow plumbing, errors, secrets and the demo builder. Imports nothing of the
project above it (``tasks``, ``registry``, ``flows``)."""

__version__ = "0.1.0"
