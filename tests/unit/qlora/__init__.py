"""Tests of the ground floor: config, locks, MLflow names, model loading."""
