"""Errors that lmstack raises for bad input.

Every error a user can cause is an `LmstackError` whose message names the file, field or
value at fault and says what to do, so the CLI can print it without a traceback.
"""


class LmstackError(Exception):
    """Base class: a problem with the user's input, files or options (not a bug in lmstack)."""


class ConfigError(LmstackError, ValueError):
    """A model, training or generation option is missing, unknown or out of range."""


class CheckpointError(LmstackError):
    """A model directory or weight file is missing, corrupt, or does not match the model."""


class TokenizerError(LmstackError):
    """A tokenizer file is missing or invalid, or a chat template failed to render."""


class DataError(LmstackError):
    """A corpus, shard or record is missing, malformed or empty."""


class RequestError(LmstackError, ValueError):
    """A generation request that can never be served (too long for the context or the KV pool)."""


class TrainingError(LmstackError):
    """A training run cannot go on (e.g. the loss stayed non-finite); the message names the last good checkpoint."""
