"""One whole flow (tokenize -> register, on a temporary Prefect server) per scenario: the happy path, each model family, user errors, faults."""
