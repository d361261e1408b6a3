"""camgate's own error types.

Every problem camgate can name for the user (a bad model card, data set, policy, option, storage
failure) derives from :class:`CamgateError`; the CLI turns those into exit code 2 with a one-line
message. Anything else that escapes is a bug and exits 3 (see :mod:`camgate.cli`).
"""


class CamgateError(Exception):
    """A problem with the user's input, configuration or environment, stated for the user."""


class ConfigError(CamgateError, ValueError):
    """An option, model card, method, target, layer list or other setting is unusable.

    Raised before any data is read; a ``ValueError`` too, for callers that catch that."""


class ModelCardError(ConfigError):
    """The model card (or what it points to) is unusable; raised before any compute."""
