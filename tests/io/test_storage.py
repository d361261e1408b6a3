"""camgate.io.storage and its S3 client (camgate.io.s3) against a real SeaweedFS server and local paths."""
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from camgate.io import s3, storage
from camgate.io.devserver import S3Server
from camgate.io.storage import AccessDenied, NotFound, StorageError


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("CAMGATE_S3_RETRIES", "3")
    monkeypatch.setenv("CAMGATE_S3_BACKOFF", "0.05")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- basics

def test_round_trip_s3(s3_bucket):
    blob = os.urandom(300_000)
    uri = f"{s3_bucket}/a/b/blob.bin"
    storage.write_bytes(uri, blob)
    assert storage.read_bytes(uri) == blob
    storage.write_bytes(uri, b"")  # overwrite, and empty objects are fine
    assert storage.read_bytes(uri) == b""


def test_round_trip_local(tmp_path):
    path = tmp_path / "new" / "dir" / "x.bin"
    storage.write_bytes(path, b"abc")
    assert storage.read_bytes(str(path)) == b"abc"
    assert storage.read_bytes(f"file://{path}") == b"abc"
    # the temp file is gone and the result has normal (umask) permissions, not mkstemp's 0600
    assert os.listdir(path.parent) == ["x.bin"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o044


def test_upload_download_multipart(s3_bucket, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024))  # above minio's 5 MiB part size
    storage.upload(src, f"{s3_bucket}/big.bin")
    dst = tmp_path / "out" / "big.bin"
    storage.download(f"{s3_bucket}/big.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(NotFound):
        storage.upload(tmp_path / "missing.bin", f"{s3_bucket}/m.bin")


def test_list_uris_s3(s3_bucket):
    for key in ["set/images/b.png", "set/images/a.png", "set/masks/a.png", "settings.yaml"]:
        storage.write_bytes(f"{s3_bucket}/{key}", b"x")
    expected = [f"{s3_bucket}/set/images/a.png", f"{s3_bucket}/set/images/b.png",
                f"{s3_bucket}/set/masks/a.png"]
    assert storage.list_uris(f"{s3_bucket}/set") == expected  # a folder, not a string prefix
    assert storage.list_uris(f"{s3_bucket}/set/") == expected
    assert storage.list_uris(s3_bucket) == expected + [f"{s3_bucket}/settings.yaml"]
    assert storage.list_uris(f"{s3_bucket}/nothing/") == []
    with pytest.raises(NotFound):
        storage.list_uris("s3://no-such-bucket-camgate/x/")


def test_list_uris_local(tmp_path):
    for rel in ["b/2.png", "a/1.png", "a/c/3.png"]:
        storage.write_bytes(tmp_path / rel, b"x")
    assert storage.list_uris(tmp_path) == [str(tmp_path / r) for r in
                                           ["a/1.png", "a/c/3.png", "b/2.png"]]
    assert storage.list_uris(tmp_path / "missing") == []


def test_exists(s3_bucket, tmp_path):
    storage.write_bytes(f"{s3_bucket}/k", b"1")
    assert storage.exists(f"{s3_bucket}/k")
    assert not storage.exists(f"{s3_bucket}/nope")
    assert storage.exists(s3_bucket)
    assert not storage.exists("s3://no-such-bucket-camgate/k")
    assert not storage.exists(tmp_path / "nope")
    storage.write_bytes(tmp_path / "yes", b"1")
    assert storage.exists(tmp_path / "yes")


def test_missing_objects_raise_not_found(s3_bucket, tmp_path):
    with pytest.raises(NotFound) as err:
        storage.read_bytes(f"{s3_bucket}/missing.png")
    assert err.value.uri == f"{s3_bucket}/missing.png"
    assert "missing.png" in str(err.value)
    with pytest.raises(NotFound):
        storage.read_bytes("s3://no-such-bucket-camgate/k")
    with pytest.raises(NotFound):
        storage.download(f"{s3_bucket}/missing.png", tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()
    with pytest.raises(NotFound):
        storage.read_bytes(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- paths

@pytest.mark.parametrize("base, rel, expected", [
    ("s3://b/sets/m.csv", "img/1.png", "s3://b/sets/img/1.png"),
    ("s3://b/sets/m.csv", "./img/../img/1.png", "s3://b/sets/img/1.png"),
    ("s3://b/m.csv", "1.png", "s3://b/1.png"),
    ("s3://b/sets/m.csv", "s3://other/x.png", "s3://other/x.png"),
    ("s3://b/sets/m.csv", "/abs/x.png", "/abs/x.png"),
    ("/data/sets/m.csv", "img/1.png", "/data/sets/img/1.png"),
    ("/data/sets/m.csv", "s3://b/x.png", "s3://b/x.png"),
    ("/data/sets/m.csv", "/elsewhere/x.png", "/elsewhere/x.png"),
    ("m.csv", "img/1.png", "img/1.png"),
])
def test_resolve(base, rel, expected):
    assert storage.resolve(base, rel) == expected


@pytest.mark.parametrize("base", ["s3://b/sets/m.csv", "/data/sets/m.csv"])
@pytest.mark.parametrize("rel", ["../x.png", "img/../../x.png", ".."])
def test_resolve_refuses_escape(base, rel):
    with pytest.raises(StorageError, match="escapes the manifest folder"):
        storage.resolve(base, rel)


def test_resolve_allow_escape():
    assert storage.resolve("s3://b/sets/m.csv", "../x.png", allow_escape=True) == "s3://b/x.png"
    assert storage.resolve("/data/sets/m.csv", "../x.png", allow_escape=True) == "/data/x.png"
    with pytest.raises(StorageError, match="above bucket"):
        storage.resolve("s3://b/m.csv", "../x.png", allow_escape=True)


def test_join_and_is_s3():
    assert storage.join("s3://b", "set", "a.png") == "s3://b/set/a.png"
    assert storage.join("s3://b/set/", "/a.png") == "s3://b/set/a.png"
    assert storage.join("s3://", "b", "k") == "s3://b/k"
    assert storage.join("/data", "a", "b.png") == "/data/a/b.png"
    assert storage.is_s3("s3://b/k") and storage.is_s3("S3://b/k")
    assert not storage.is_s3("/s3/b") and not storage.is_s3("b.png")


@pytest.mark.parametrize("uri", ["http://host/x.png", "gs://b/x.png", "ftp://h/x"])
def test_unsupported_scheme(uri, tmp_path):
    for call in (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b""),
                 lambda: storage.exists(uri), lambda: storage.list_uris(uri),
                 lambda: storage.resolve(str(tmp_path / "m.csv"), uri)):
        with pytest.raises(StorageError, match="unsupported URI scheme") as err:
            call()
        assert err.value.uri == uri


# ----------------------------------------------------------------------------- atomicity

class Boom(Exception):
    pass


def test_atomic_output_local(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(Boom):
        with storage.atomic_output(target) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".parquet")
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise Boom
    assert os.listdir(tmp_path) == []
    with storage.atomic_output(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"whole")
        assert not target.exists()  # invisible until the block ends
    assert target.read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["out.parquet"]


def test_atomic_output_s3(s3_bucket):
    uri = f"{s3_bucket}/results/out.parquet"
    with pytest.raises(Boom):
        with storage.atomic_output(uri) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise Boom
    assert not storage.exists(uri)
    assert not os.path.exists(tmp)
    with storage.atomic_output(uri) as tmp:
        assert tmp.endswith("out.parquet")
        with open(tmp, "wb") as f:
            f.write(b"whole")
    assert storage.read_bytes(uri) == b"whole"
    assert not os.path.exists(tmp)


def test_readers_never_see_partial_local_writes(tmp_path):
    path = tmp_path / "f.bin"
    versions = [b"a" * 400_000, b"b" * 800_000]
    storage.write_bytes(path, versions[0])
    done = threading.Event()
    seen = set()

    def reader():
        while not done.is_set():
            seen.add(storage.read_bytes(path))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            storage.write_bytes(path, versions[i % 2])
    finally:
        done.set()
        thread.join()
    assert seen <= set(versions)


# ----------------------------------------------------------------------------- errors

def test_wrong_secret_is_access_denied_without_leaking(s3_bucket, monkeypatch):
    storage.write_bytes(f"{s3_bucket}/k", b"1")
    secret = "WrongSecret-0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    start = time.monotonic()
    with pytest.raises(AccessDenied) as err:
        storage.read_bytes(f"{s3_bucket}/k")
    assert time.monotonic() - start < 3  # rejected credentials are not retried
    msg = str(err.value)
    assert f"{s3_bucket}/k" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert secret not in msg and secret not in repr(err.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(AccessDenied):
        storage.write_bytes(f"{s3_bucket}/k2", b"1")


def test_client_follows_env(s3_server, monkeypatch):
    first = s3._client("s3://b/k")
    assert s3._client("s3://b/k") is first
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another")
    assert s3._client("s3://b/k") is not first


def test_missing_configuration(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL"):
        storage.read_bytes("s3://bkt/k")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY"):
        storage.read_bytes("s3://bkt/k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/no/such/ca.pem")
    with pytest.raises(StorageError, match="AWS_CA_BUNDLE"):
        storage.read_bytes("s3://bkt/k")


# ----------------------------------------------------------------------------- retries

def test_reads_survive_server_restart(s3_server, s3_bucket, monkeypatch):
    # finer steps than the default, same ~30 s span: a restart whose shutdown hangs to the kill
    # (~7 s) plus seaweed's few seconds of InternalError while it relocates volumes still fit
    monkeypatch.setenv("CAMGATE_S3_BACKOFF", "0.5")
    monkeypatch.setenv("CAMGATE_S3_RETRIES", "7")
    uri = f"{s3_bucket}/k"
    storage.write_bytes(uri, b"payload")
    done = threading.Event()
    results = []

    def reader():
        while not done.is_set():
            try:
                data = storage.read_bytes(uri)
            except Exception as exc:  # recorded, asserted below
                data = exc
            results.append((time.monotonic(), data))
            time.sleep(0.02)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        time.sleep(0.3)
        s3_server.restart()
        restarted = time.monotonic()
        time.sleep(0.5)
    finally:
        done.set()
        thread.join()
    assert [r for _, r in results if r != b"payload"] == []
    assert any(t > restarted for t, _ in results)  # reads went on after the restart
    storage.write_bytes(uri, b"after")  # and the server is usable again
    assert storage.read_bytes(uri) == b"after"


def test_writes_survive_a_crash_restart(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("CAMGATE_S3_BACKOFF", "0.5")
    errors, written = [], []

    def writer():
        for i in range(40):
            try:
                storage.write_bytes(f"{s3_bucket}/w/{i:03d}", str(i).encode())
                written.append(i)
            except Exception as exc:  # recorded, asserted below
                errors.append(exc)
            time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.2)
    s3_server.restart(hard=True)  # SIGKILL: nothing flushed or drained
    thread.join()
    assert errors == [] and len(written) == 40
    assert storage.list_uris(f"{s3_bucket}/w") == [f"{s3_bucket}/w/{i:03d}" for i in range(40)]
    assert storage.read_bytes(f"{s3_bucket}/w/007") == b"7"


def test_server_down_fails_in_bounded_time(s3_server, monkeypatch, fast_retries):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://bkt/k.png")
    assert time.monotonic() - start < 5
    assert not isinstance(err.value, (NotFound, AccessDenied))
    assert "s3://bkt/k.png" in str(err.value) and "3 attempts" in str(err.value)
    assert "refused" in str(err.value).lower()


def test_default_backoff_spans_about_30s():
    total = sum(s3._delays(s3.DEFAULT_RETRIES, s3.DEFAULT_BACKOFF))
    assert s3.DEFAULT_RETRIES == 6 and 20 <= total <= 40


class _Scripted(BaseHTTPRequestHandler):
    """Answers from a script of S3 error codes, then 200; counts requests."""
    script: list = []
    count = 0

    def _answer(self):
        type(self).count += 1
        status, code = self.script.pop(0) if self.script else (200, None)
        body = b"ok" if code is None else (
            f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>scripted</Message>"
            f"<Resource>{self.path}</Resource><RequestId>1</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml" if code else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted(monkeypatch, fast_retries):
    """An HTTP endpoint answering like an S3 server under stress: faults we can't make SeaweedFS
    produce on demand (503 SlowDown, 500 InternalError)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")  # no bucket-location lookup
    _Scripted.count = 0
    yield _Scripted
    server.shutdown()
    server.server_close()


def test_transient_server_errors_are_retried(scripted):
    scripted.script = [(503, "SlowDown"), (500, "InternalError")]
    assert storage.read_bytes("s3://bkt/k") == b"ok"
    assert scripted.count == 3
    scripted.script, scripted.count = [(503, "ServiceUnavailable")] * 5, 0
    with pytest.raises(StorageError, match="3 attempts.*ServiceUnavailable"):
        storage.read_bytes("s3://bkt/k")
    assert scripted.count == 3


@pytest.mark.parametrize("status, code, exc", [
    (403, "AccessDenied", AccessDenied), (404, "NoSuchKey", NotFound),
    (404, "NoSuchBucket", NotFound)])
def test_permanent_errors_are_not_retried(scripted, status, code, exc):
    scripted.script = [(status, code)] * 5
    with pytest.raises(exc):
        storage.read_bytes("s3://bkt/k")
    assert scripted.count == 1


# ----------------------------------------------------------------------------- devserver

def test_devserver_cli_beside_session_server(s3_server, tmp_path, monkeypatch):
    """A second server (as the demo runs beside the tests) gets its own ports and stops clean."""
    proc = subprocess.Popen([sys.executable, "-m", "camgate.io.devserver", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        env = {}
        for _ in range(4):
            key, _, value = proc.stdout.readline().removeprefix("export ").strip().partition("=")
            env[key] = value
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert env["AWS_ENDPOINT_URL"] != s3_server.endpoint
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        storage.write_bytes(storage.join(storage.ensure_bucket("cli-check"), "k"), b"1")
        assert storage.read_bytes("s3://cli-check/k") == b"1"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):  # weed went down with it
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert (tmp_path / "weed.log").stat().st_size > 0


def _self_signed(folder):
    """A cert/key pair for 127.0.0.1 (the cert is its own CA)."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_endpoint_with_ca_bundle(tmp_path, monkeypatch, fast_retries):
    cert, key = _self_signed(tmp_path)
    with S3Server(tmp_path / "data", tls_cert=cert, tls_key=key) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        assert server.endpoint.startswith("https://")
        uri = storage.join(storage.ensure_bucket("tls-check"), "k")
        storage.write_bytes(uri, b"over tls")
        assert storage.read_bytes(uri) == b"over tls"
        monkeypatch.delenv("AWS_CA_BUNDLE")  # an untrusted cert fails at once, with a hint
        with pytest.raises(StorageError, match="AWS_CA_BUNDLE"):
            storage.read_bytes(uri)
