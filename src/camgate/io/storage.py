"""One storage face for ``s3://bucket/key`` URIs and local paths.

S3 is reached through the ``minio`` SDK (:mod:`.s3`: configured only from the standard
environment, transient failures retried with bounded exponential backoff); writes are atomic on
both backends; :func:`sha256` is the one hash of camgate's artifacts. Error messages name the URI
and the problem, never credentials.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import mimetypes
import os
import posixpath
import re
import shutil
import tempfile
from typing import Iterator
from urllib.parse import urlsplit

from ..errors import AccessDenied, NotFound, StorageError
from . import s3

__all__ = [
    "StorageError", "NotFound", "AccessDenied",
    "is_s3", "read_bytes", "write_bytes", "exists", "list_uris", "resolve", "join",
    "atomic_output", "download", "upload", "ensure_bucket",
]

_CHUNK = 1 << 20
_TMP_MARK = ".camgate-tmp-"  # temp files carry this so listings can skip them

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# --------------------------------------------------------------------------- URIs

def _fspath(uri) -> str:
    return os.fspath(uri) if not isinstance(uri, str) else uri


def _scheme(uri: str) -> str | None:
    m = _SCHEME_RE.match(uri)
    return m.group(1).lower() if m else None


def is_s3(uri) -> bool:
    return _scheme(_fspath(uri)) == "s3"


def _local(uri: str) -> str | None:
    """The local path for ``uri``, None for s3; unsupported schemes raise."""
    scheme = _scheme(uri)
    if scheme is None:
        return uri
    if scheme == "s3":
        return None
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"unsupported file URI with a host: {uri}", uri=uri)
        return parts.path
    raise StorageError(f"unsupported URI scheme {scheme!r} in {uri} "
                       "(use s3://bucket/key or a local path)", uri=uri)


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"no bucket in S3 URI {uri}", uri=uri)
    return bucket, key


def _object(uri: str) -> tuple[str, str]:
    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"no object key in S3 URI {uri}", uri=uri)
    return bucket, key


def join(prefix, *parts) -> str:
    prefix = _fspath(prefix)
    parts = [_fspath(p) for p in parts if _fspath(p)]
    if is_s3(prefix):
        out = prefix.rstrip("/")
        if out == "s3:":  # bare "s3://": the first part is the bucket
            out = "s3:/"
        for p in parts:
            out = out + "/" + p.strip("/")
        return out
    local = _local(prefix)
    return os.path.join(local, *parts)


def resolve(base, rel, allow_escape: bool = False) -> str:
    """``rel`` relative to the folder holding ``base`` (a file URI or path).

    Full URIs and absolute paths are returned unchanged. A relative path that climbs out of
    base's folder is refused unless ``allow_escape``: manifests must not reach arbitrary
    objects through ``..``.
    """
    base, rel = _fspath(base), _fspath(rel)
    if not rel:
        raise StorageError(f"empty path relative to {base}", uri=base)
    scheme = _scheme(rel)
    if scheme is not None:
        if scheme != "s3":
            _local(rel)  # raises for unsupported schemes
        return rel
    if os.path.isabs(rel):
        return rel
    norm = posixpath.normpath(rel.replace(os.sep, "/"))
    if (norm == ".." or norm.startswith("../")) and not allow_escape:
        raise StorageError(f"relative path {rel!r} escapes the manifest folder of {base}; "
                           "use an absolute path or full URI instead", uri=rel)
    if is_s3(base):
        bucket, key = _split_s3(base)
        folder = posixpath.dirname(key)
        joined = posixpath.normpath(posixpath.join(folder, norm)) if folder else norm
        if joined == ".." or joined.startswith("../"):
            raise StorageError(f"relative path {rel!r} climbs above bucket {bucket!r}",
                               uri=rel)
        return f"s3://{bucket}/" + ("" if joined == "." else joined)
    folder = os.path.dirname(_local(base))
    return os.path.normpath(os.path.join(folder, rel))


# --------------------------------------------------------------------------- local helpers

def _umask() -> int:
    try:  # read without touching the process umask (os.umask is a racy set/reset)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkstemp_beside(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    ext = os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}{_TMP_MARK}", suffix=ext)
    os.close(fd)
    return tmp


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit_local(tmp: str, path: str) -> None:
    """fsync ``tmp``, give it normal permissions (mkstemp makes 0600), rename over ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _local_error(uri: str, exc: OSError) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"not found: {uri}", uri=uri)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"access denied for {uri}: permission denied", uri=uri)
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri} is a directory, not a file", uri=uri)
    return StorageError(f"I/O error on {uri}: {exc.strerror or exc}", uri=uri)


# --------------------------------------------------------------------------- public API

def read_bytes(uri) -> bytes:
    uri = _fspath(uri)
    path = _local(uri)
    if path is not None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise _local_error(uri, exc) from exc
    bucket, key = _object(uri)

    def get(client):
        resp = client.get_object(bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    return s3.call("read", uri, get)


def write_bytes(uri, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old object/file or the new one, never a part."""
    uri = _fspath(uri)
    data = bytes(data)
    if _local(uri) is not None:
        with atomic_output(uri) as tmp:
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
            except OSError as exc:
                raise _local_error(uri, exc) from exc
        return
    bucket, key = _object(uri)
    ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
    # a single PUT (or completed multipart upload) is atomic in S3
    s3.call("write", uri, lambda c: c.put_object(bucket, key, io.BytesIO(data), len(data),
                                               content_type=ctype))


def exists(uri) -> bool:
    uri = _fspath(uri)
    path = _local(uri)
    if path is not None:
        return os.path.exists(path)
    bucket, key = _split_s3(uri)
    if not key:
        return s3.call("check", uri, lambda c: c.bucket_exists(bucket))
    try:
        s3.call("check", uri, lambda c: c.stat_object(bucket, key))
        return True
    except NotFound:
        return False


def delete(uri) -> None:
    """Remove a file/object; a missing one is not an error."""
    uri = _fspath(uri)
    path = _local(uri)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    bucket, key = _object(uri)
    s3.call("delete", uri, lambda c: c.remove_object(bucket, key))


def local_path(uri) -> str | None:
    """The local file path of ``uri``; None for s3:// (unsupported schemes raise StorageError)."""
    return _local(_fspath(uri))


def list_uris(prefix) -> list[str]:
    """Sorted full URIs of every object/file below ``prefix`` (recursive).

    ``prefix`` is a folder on both backends: ``s3://b/set`` lists ``set/...`` but not
    ``settings/...``. A missing local folder lists as empty; a missing bucket raises NotFound.
    """
    prefix = _fspath(prefix)
    path = _local(prefix)
    if path is not None:
        if os.path.isfile(path):
            return [prefix]
        out = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in files:
                if _TMP_MARK not in name:
                    out.append(os.path.join(root, name))
        return sorted(out)
    bucket, key = _split_s3(prefix)
    if key and not key.endswith("/"):
        key += "/"

    def listing(client):
        return [f"s3://{bucket}/{o.object_name}"
                for o in client.list_objects(bucket, prefix=key or None, recursive=True)
                if not o.is_dir]

    return sorted(s3.call("list", prefix, listing))


def download(uri, local_path) -> None:
    """Copy ``uri`` to ``local_path`` (atomically; parent folders are created)."""
    uri, local_path = _fspath(uri), _fspath(local_path)
    src = _local(uri)
    with atomic_output(local_path) as tmp:
        if src is not None:
            try:
                shutil.copyfile(src, tmp)
            except OSError as exc:
                raise _local_error(uri, exc) from exc
            return
        bucket, key = _object(uri)

        def fetch(client):
            resp = client.get_object(bucket, key)
            try:
                with open(tmp, "wb") as f:  # "wb": a retried attempt starts over
                    for chunk in resp.stream(_CHUNK):
                        f.write(chunk)
            finally:
                resp.close()
                resp.release_conn()

        s3.call("download", uri, fetch)


def upload(local_path, uri) -> None:
    """Copy the local file ``local_path`` to ``uri`` (atomically)."""
    local_path, uri = _fspath(local_path), _fspath(uri)
    if not os.path.isfile(local_path):
        raise NotFound(f"not found: {local_path} (nothing to upload to {uri})",
                       uri=local_path)
    dst = _local(uri)
    if dst is not None:
        with atomic_output(dst) as tmp:
            try:
                shutil.copyfile(local_path, tmp)
            except OSError as exc:
                raise _local_error(local_path, exc) from exc
        return
    bucket, key = _object(uri)
    ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
    s3.call("upload", uri, lambda c: c.fput_object(bucket, key, local_path, content_type=ctype))


@contextlib.contextmanager
def atomic_output(uri) -> Iterator[str]:
    """Yield a local path to write; on clean exit it appears at ``uri`` in one step.

    On an exception nothing appears at ``uri`` and the temporary file is removed.
    """
    uri = _fspath(uri)
    path = _local(uri)
    if path is not None:
        try:
            tmp = _mkstemp_beside(path)
        except OSError as exc:
            raise _local_error(uri, exc) from exc
        try:
            yield tmp
            try:
                _commit_local(tmp, path)
            except OSError as exc:
                raise _local_error(uri, exc) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    _object(uri)  # fail on a bad URI before the caller does any work
    # keep the object's name so writers that look at the extension behave
    folder = tempfile.mkdtemp(prefix="camgate-")
    tmp = os.path.join(folder, posixpath.basename(uri))
    try:
        open(tmp, "wb").close()
        yield tmp
        upload(tmp, uri)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ensure_bucket(name_or_uri) -> str:
    """Create the bucket if missing; returns ``s3://<bucket>``."""
    name_or_uri = _fspath(name_or_uri)
    if is_s3(name_or_uri):
        bucket, _ = _split_s3(name_or_uri)
    else:
        bucket = name_or_uri.strip("/")
    uri = f"s3://{bucket}"

    def make(client):
        from minio.error import S3Error

        if client.bucket_exists(bucket):
            return
        try:
            client.make_bucket(bucket)
        except S3Error as exc:  # created by someone else meanwhile
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    s3.call("create bucket", uri, make)
    return uri

def read_source(where: str, error: type[Exception], what: str) -> bytes:
    """The bytes of a local path or a URI; a local path that cannot be read raises ``error`` naming
    ``what``."""
    if where.startswith("file://"):
        where = where[len("file://"):]
    if "://" in where:
        return read_bytes(where)
    try:
        with open(where, "rb") as f:
            return f.read()
    except OSError as e:
        raise error(f"{where}: cannot read {what}: {e.strerror or e}") from None


def sha256(uri) -> str:
    """sha256 (hex) of the bytes at ``uri``, read in chunks: weights are hashed without holding them
    in memory. The one hash of camgate's artifacts: cards, weights, manifests, policies, records."""
    uri = _fspath(uri)
    path = _local(uri)
    if path is None:
        with tempfile.TemporaryDirectory(prefix="camgate-") as tmp:
            local = os.path.join(tmp, "blob")
            download(uri, local)
            return _sha256_file(local, uri)
    return _sha256_file(path, uri)


def _sha256_file(path: str, uri: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as exc:
        raise _local_error(uri, exc) from exc
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """sha256 (hex) of bytes already in memory: an image or mask as it was read for a row."""
    return hashlib.sha256(data).hexdigest()


def sha256_or_none(uri) -> str | None:
    """:func:`sha256`, or None when there is no URI or nothing readable behind it."""
    if uri is None or not isinstance(uri, (str, os.PathLike)) or not str(uri):
        return None
    try:
        return sha256(uri)
    except StorageError:
        return None
