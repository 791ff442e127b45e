"""The two errors that users cause, at the bottom of the import graph (every layer raises them;
``orchestrator.core.config`` re-exports both)."""


class ConfigError(ValueError):
    """Invalid configuration; the message names the file (or flag), the key and what was expected."""


class InputError(ConfigError):
    """Bad input found before anything starts (data, source model, URIs, resources); exit code 2."""
