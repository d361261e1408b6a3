"""camgate's own error types.

Every problem camgate can name for the user (a bad model card, data set, policy, option, storage
failure) derives from :class:`CamgateError`; the CLI turns those into exit code 2 with a one-line
message. Anything else that escapes is a bug and exits 3 (see :mod:`camgate.cli`).
"""
import os


class CamgateError(Exception):
    """A problem with the user's input, configuration or environment, stated for the user."""


class ConfigError(CamgateError, ValueError):
    """An option, model card, method, target, layer list or other setting is unusable.

    Raised before any data is read; a ``ValueError`` too, for callers that catch that."""


class IdentityError(ConfigError):
    """Two artifacts that must describe the same run do not (another model, method, layer or images):
    the message names the field that differs and both values."""


class ModelCardError(ConfigError):
    """The model card (or what it points to) is unusable; raised before any compute."""


def scrub_secrets(text: str) -> str:
    """Belt and braces: a secret from the env never reaches a message."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, "***")
    return text


class StorageError(CamgateError):
    """A storage operation failed; ``uri`` names the object or path involved."""

    def __init__(self, message: str, uri: str | None = None):
        super().__init__(scrub_secrets(message))
        self.uri = uri


class NotFound(StorageError):
    """The object, file or bucket does not exist."""


class AccessDenied(StorageError):
    """Credentials were rejected or the operation is forbidden."""
