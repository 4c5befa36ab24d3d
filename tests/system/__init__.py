"""System tests (make test-slow): real Prefect and MLflow servers, PostgreSQL, workers, killed processes, sweeps, torchrun, GPUs. Every test here is marked slow by tests/conftest.py."""
