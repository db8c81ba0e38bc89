"""The one exception family medboost raises for bad input.

Every problem a user can cause (a missing or corrupt file, a wrong layer index, an unsupported architecture, data of
the wrong shape) is raised as a subclass of :class:`MedboostError` with one message that names the file or source and
the problem. The command line catches exactly this family, prints the message and exits non-zero; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class MedboostError(Exception):
    """Base class for errors caused by the user's input, files or environment."""


class BlockLoadError(MedboostError):
    """A language-model block could not be loaded from the given source."""


class DataError(MedboostError):
    """A data file or dataset is missing, corrupt or does not match what was expected."""


class ConfigError(MedboostError):
    """A model or training configuration is invalid."""


class TrainingError(MedboostError):
    """Training cannot go on (e.g. the loss became non-finite); the message says what to change."""
