"""The S3 client behind :mod:`.storage`: configured only from the standard environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optional ``AWS_REGION``,
``AWS_SESSION_TOKEN``, ``AWS_CA_BUNDLE``), one pool per environment and process, and :func:`call`:
bounded exponential backoff on transient failures (``CAMGATE_S3_RETRIES`` attempts,
``CAMGATE_S3_BACKOFF`` base seconds), every other failure turned into a :class:`StorageError` that
names the URI and never a credential.
"""
from __future__ import annotations

import http.client
import logging
import os
import random
import threading
import time
from typing import Callable, TypeVar
from urllib.parse import urlsplit

from ..errors import AccessDenied, NotFound, StorageError, scrub_secrets

log = logging.getLogger("camgate.io.storage")  # the name users configure for storage warnings
T = TypeVar("T")

DEFAULT_RETRIES = 6          # attempts, not re-tries: 1 + 5 waits
DEFAULT_BACKOFF = 1.0        # base seconds: waits ~1, 2, 4, 8, 16 -> ~31 s in all
_MAX_DELAY = 30.0
_CONNECT_TIMEOUT = 5.0
_READ_TIMEOUT = 60.0
_ACCESS_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "InvalidToken", "ExpiredToken", "AccountProblem", "InvalidSecurity",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "ResourceNotFound", "NoSuchUpload"}
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "OperationAborted", "ServerBusy",
}

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _client(uri: str):
    env = {k: os.environ.get(k) or None for k in (
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_CA_BUNDLE")}
    # keyed on the env (tests switch servers/credentials) and the pid (pools don't survive fork)
    key = (os.getpid(),) + tuple(env.values())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _make_client(uri, env)
            if len(_clients) >= 8:  # tests switch env often; keep the newest few pools
                _clients.pop(next(iter(_clients)))
            _clients[key] = client
        return client


def _make_client(uri: str, env: dict):
    import certifi
    import urllib3
    from minio import Minio

    endpoint = env["AWS_ENDPOINT_URL"]
    if not endpoint:
        raise StorageError(f"cannot reach {uri}: AWS_ENDPOINT_URL is not set "
                           "(e.g. http://127.0.0.1:9000 or https://s3.example.com)", uri=uri)
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise StorageError(f"AWS_ENDPOINT_URL must look like http(s)://host[:port], "
                           f"got {endpoint!r}", uri=uri)
    if not env["AWS_ACCESS_KEY_ID"] or not env["AWS_SECRET_ACCESS_KEY"]:
        raise StorageError(f"cannot access {uri}: AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY must both be set", uri=uri)
    ca = env["AWS_CA_BUNDLE"]
    if ca and not os.path.isfile(ca):
        raise StorageError(f"AWS_CA_BUNDLE points to a missing file: {ca}", uri=uri)
    # minio's own pool retries 5x with 5-minute timeouts; turn pool retries off so _call's
    # bounded, logged backoff is the only one.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=_READ_TIMEOUT),
        maxsize=16,
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca or os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=0, redirect=False),
    )
    return Minio(
        parts.netloc,
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        session_token=env["AWS_SESSION_TOKEN"],
        secure=parts.scheme == "https",
        region=env["AWS_REGION"],
        http_client=http,
    )


def _retry_settings(uri: str) -> tuple[int, float]:
    try:
        attempts = int(os.environ.get("CAMGATE_S3_RETRIES") or DEFAULT_RETRIES)
        backoff = float(os.environ.get("CAMGATE_S3_BACKOFF") or DEFAULT_BACKOFF)
    except ValueError:
        raise StorageError("CAMGATE_S3_RETRIES must be an integer and "
                           "CAMGATE_S3_BACKOFF a number of seconds", uri=uri) from None
    return max(1, attempts), max(0.0, backoff)


def _delays(attempts: int, backoff: float) -> list[float]:
    """Nominal waits between attempts (before jitter)."""
    return [min(backoff * 2 ** i, _MAX_DELAY) for i in range(attempts - 1)]


def _describe(exc: BaseException) -> str:
    import urllib3
    from minio.error import S3Error

    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    return f"{type(exc).__name__}: {exc}"


def _classify(exc: BaseException, uri: str):
    """None when ``exc`` is worth retrying, else the StorageError to raise (or _UNHANDLED)."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 0
        if exc.code in _ACCESS_CODES or status == 403:
            return AccessDenied(f"access denied for {uri}: check AWS_ACCESS_KEY_ID/"
                                f"AWS_SECRET_ACCESS_KEY and the bucket policy ({exc.code})",
                                uri=uri)
        if exc.code in _NOT_FOUND_CODES or status == 404:
            what = "bucket" if exc.code == "NoSuchBucket" else "object"
            return NotFound(f"not found: {uri} (no such {what})", uri=uri)
        if exc.code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return None
        return StorageError(f"S3 request for {uri} failed: {_describe(exc)}", uri=uri)
    if isinstance(exc, (ServerError, InvalidResponseError)):
        status = exc.status_code if isinstance(exc, ServerError) else exc._code
        if status >= 500 or status == 429:
            return None
        if status == 403:
            return AccessDenied(f"access denied for {uri}: check AWS_ACCESS_KEY_ID/"
                                "AWS_SECRET_ACCESS_KEY (HTTP 403)", uri=uri)
        if status == 404:
            return NotFound(f"not found: {uri}", uri=uri)
        return StorageError(f"S3 request for {uri} failed: HTTP {status}", uri=uri)
    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    if isinstance(reason, urllib3.exceptions.SSLError):
        return StorageError(f"TLS error reaching {uri}: {reason} "
                            "(set AWS_CA_BUNDLE to the server's CA certificate)", uri=uri)
    if isinstance(reason, urllib3.exceptions.LocationValueError):
        return StorageError(f"bad endpoint for {uri}: {reason}", uri=uri)
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError,
                        http.client.HTTPException)):
        return None
    if isinstance(exc, ValueError):  # minio validates names client-side
        return StorageError(f"invalid S3 URI {uri}: {exc}", uri=uri)
    if isinstance(exc, OSError):
        return StorageError(f"local I/O error while transferring {uri}: {exc}", uri=uri)
    return _UNHANDLED  # a bug or something unexpected: let the original propagate


_UNHANDLED = object()


def call(op: str, uri: str, fn: Callable[[object], T]) -> T:
    """Run ``fn(client)`` with bounded exponential backoff on transient errors."""
    attempts, backoff = _retry_settings(uri)
    delays = _delays(attempts, backoff)
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn(_client(uri))
        except Exception as exc:  # noqa: BLE001 - classified below
            err = _classify(exc, uri)
            if err is _UNHANDLED or err is exc:
                raise
            if err is not None:
                raise err from exc
            if attempt == attempts:
                raise StorageError(
                    f"{op} {uri} failed after {attempts} attempts in "
                    f"{time.monotonic() - start:.1f}s: {_describe(exc)}", uri=uri) from exc
            delay = delays[attempt - 1] * random.uniform(0.8, 1.2)
            log.warning("%s %s: %s; retrying in %.1fs (attempt %d/%d)",
                        op, uri, scrub_secrets(_describe(exc)), delay, attempt + 1, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")
