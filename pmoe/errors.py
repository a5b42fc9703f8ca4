"""User-facing errors.

Every error a user can cause (a wrong path, an unknown preset, a corrupt image, a checkpoint
from another config) is a :class:`PmoeError` whose message says what is wrong, where, and
what to do. The command line prints such errors without a traceback.
"""


class PmoeError(Exception):
    """An error caused by input the user can fix; the message names the fix."""


class ConfigError(PmoeError, ValueError):
    """An unknown preset or key, or a value of the wrong type."""


class DataError(PmoeError, ValueError):
    """A dataset, manifest, image or mask that cannot be used as it is."""


class CheckpointError(PmoeError, ValueError):
    """A weights or checkpoint file that is missing or does not match the model."""
