"""Error types that tell a user's mistake from a transient fault.

Retry policies (see ``tasks/prefect_tasks.py``) never retry a ``UserError``: re-running bad input
wastes compute and hides the message. Every ``UserError`` names the file, line or config key at fault
and says what to do.
"""


class UserError(Exception):
    """Bad input from the user: a config value, a data row, a missing path. Not retried."""


class ConfigError(UserError):
    """A config file or override that does not load into the typed config."""


class DataError(UserError):
    """A dataset that cannot be read or tokenized as configured."""


class ModelError(UserError):
    """A base model or adapter that cannot be found or loaded as configured."""
