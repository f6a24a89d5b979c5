"""Errors a user can cause. Each carries one sentence that says what is wrong and how to fix it.

The CLI prints the message of a :class:`UserError` and exits non-zero; any other exception is a bug.
"""


class UserError(Exception):
    """Base class for problems caused by input, files or options (not by a bug in vocabseg)."""


class CheckpointError(UserError):
    """A weights file is missing, unreadable, of an unknown format, or does not match the model."""


class ImageError(UserError):
    """An image cannot be read, is corrupt, or is too large."""


class VocabularyError(UserError):
    """A vocabulary is empty or malformed."""


class ConfigError(UserError):
    """A configuration file or option is invalid."""


class DatasetError(UserError):
    """A dataset folder is missing files or is laid out incorrectly."""
