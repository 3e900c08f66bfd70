"""One small exception hierarchy, so callers can catch everything the library raises on purpose."""


class PixelzError(Exception):
    """Base class of every error pixelz_dist raises deliberately."""


class ConfigError(PixelzError, ValueError):
    """An argument or option has a value the library cannot use."""


class SnapshotError(PixelzError):
    """A snapshot cannot be written, found, trusted or applied."""


class DataError(PixelzError, ValueError):
    """A dataset, folder or file is not what training needs."""


class NondeterministicOp(PixelzError, RuntimeError):
    """Under ``deterministic=True``, the model ran an op that has no deterministic implementation on its device."""
