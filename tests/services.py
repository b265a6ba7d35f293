"""Real service fixtures for tests: a moto S3 server and an MLflow tracking server.

Both run as subprocesses on free 127.0.0.1 ports and are stopped by PID. The MLflow server keeps
its runs and registry in SQLite under a temporary directory and its artifacts on the moto bucket
(``--artifacts-destination s3://seme-mlflow/artifacts --serve-artifacts``), the way the pipeline
runs it in a cluster.

When ``SEME_TEST_S3_ENDPOINT`` / ``SEME_TEST_MLFLOW_URI`` are set (``tests/services.sh start``,
used by ``.ci/run``), the fixtures reuse those servers instead of starting their own.

The same code starts and stops the servers for the shell:

    python tests/services.py start ENV_FILE     # writes SEME_TEST_S3_ENDPOINT=..., SEME_TEST_MLFLOW_URI=...
    python tests/services.py stop ENV_FILE
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MLFLOW_BUCKET = "seme-mlflow"
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "seme-test-access-key",
    "AWS_SECRET_ACCESS_KEY": "seme-test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """The console script ``name`` next to this interpreter (the venv), else from PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _wait_http(url: str, proc: subprocess.Popen | None, timeout: float, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise _ExitedWhileStarting(f"{what} exited with code {proc.returncode} while starting:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                answered = r.status < 500
        except urllib.error.HTTPError as e:
            answered = e.code < 500
        except OSError:
            answered = False
        if answered:
            time.sleep(0.2)  # a server that lost its port exits at once: not fooled by whoever holds it
            if proc is not None and proc.poll() is not None:
                raise _ExitedWhileStarting(f"{what} exited with code {proc.returncode}; {url} is someone else's")
            return
        time.sleep(0.25)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s:\n{tail}")


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """Stop the process group led by ``pid`` (the server and any workers it forked), by PID."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return
            except ChildProcessError:  # not our child: poll for existence instead
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.1)


def _start_on_a_port(
    port: int | None, start: Callable[[int], tuple[subprocess.Popen, str]], attempts: int = 5
) -> tuple[subprocess.Popen, str]:
    """``start(port)`` on ``port``, or on a free port, retried on a new one when the server exits
    while starting: a port found free can be taken by another process before the server binds it."""
    for attempt in range(attempts):
        p = port or free_port()
        try:
            return start(p)
        except _ExitedWhileStarting:
            if port is not None or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


class _ExitedWhileStarting(RuntimeError):
    """The server process ended before it answered (e.g. its port was taken)."""


def start_moto(port: int | None = None, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``python -m moto.server`` on 127.0.0.1; returns (process, endpoint url)."""

    def start(port: int) -> tuple[subprocess.Popen, str]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **DUMMY_AWS},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_http(url + "/moto-api/", proc, 60, "moto server", log)
        except BaseException:
            stop_pid(proc.pid)
            raise
        return proc, url

    return _start_on_a_port(port, start)


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the S3 endpoint (idempotent)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_creds())
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        s3.create_bucket(Bucket=bucket)


def _creds() -> dict[str, str]:
    return {
        "aws_access_key_id": DUMMY_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
    }


def start_mlflow(
    s3_endpoint: str, workdir: Path, port: int | None = None, db: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` (SQLite backend, artifacts proxied to the moto bucket)."""
    create_bucket(s3_endpoint, MLFLOW_BUCKET)
    return _start_on_a_port(port, lambda p: _start_mlflow(s3_endpoint, workdir, p, db or workdir / "mlflow.db"))


def _start_mlflow(s3_endpoint: str, workdir: Path, port: int, db: Path) -> tuple[subprocess.Popen, str]:
    log = workdir / f"mlflow-{port}.log"
    env = {
        **os.environ,
        **DUMMY_AWS,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        _bin("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", proc, 180, "mlflow server", log)
    except BaseException:
        stop_pid(proc.pid)
        raise
    return proc, url


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a running moto S3 server; AWS credentials in the env are dummy values."""
    with _env(DUMMY_AWS):
        external = os.environ.get("SEME_TEST_S3_ENDPOINT")
        if external:
            yield external
            return
        tmp = Path(tempfile.mkdtemp(prefix="seme-moto-"))
        proc, url = start_moto(log=tmp / "moto.log")
        try:
            yield url
        finally:
            stop_pid(proc.pid)
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(s3_server: str) -> Iterator[str]:
    """Tracking URI of a running MLflow server (SQLite backend, artifacts on the moto bucket)."""
    external = os.environ.get("SEME_TEST_MLFLOW_URI")
    if external:
        yield external
        return
    tmp = Path(tempfile.mkdtemp(prefix="seme-mlflow-"))
    proc, url = start_mlflow(s3_server, tmp)
    try:
        yield url
    finally:
        stop_pid(proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)


class CuttingProxy:
    """A real TCP proxy in front of a server that can drop connections mid-response.

    ``cut_after(n)`` arms it: once ``n`` more response bytes have gone through, every open
    connection is closed (a transfer cut mid-way, as when a load balancer or the network drops it).
    It records each request line and ``Range`` header seen, in order, so tests can check what a
    client actually asked for (e.g. that a resume asked for ``bytes=N-``).
    """

    def __init__(self, upstream_url: str) -> None:
        import re
        import threading
        from urllib.parse import urlparse

        u = urlparse(upstream_url)
        self._upstream = (u.hostname, u.port)
        self._re = re.compile(rb"^([A-Z]+ \S+) HTTP/1\.[01]\r\n(?:.*?\r\n)*?\r\n", re.DOTALL | re.MULTILINE)
        self._range = re.compile(rb"^range: *(bytes=\S+)\r$", re.IGNORECASE | re.MULTILINE)
        self._lock = threading.Lock()
        self._budget: int | None = None
        self._conns: list[socket.socket] = []
        self.requests: list[tuple[str, str | None]] = []  # (method + path, range header)
        self.cuts = 0
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.url = f"http://127.0.0.1:{self._srv.getsockname()[1]}"
        self._closed = False
        self._down = False
        self._fail: list | None = None  # [substring of the request line, let through, then drop]
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def set_down(self, down: bool = True) -> None:
        """Down: every open connection is closed and new ones are refused (a server that died)."""
        self._down = down
        if down:
            self.drop_all()

    def fail_requests(self, pattern: str, skip: int = 0, count: int = 1) -> None:
        """Drop ``count`` requests whose request line contains ``pattern``, after ``skip`` went through."""
        with self._lock:
            self._fail = [pattern, skip, count]

    def cut_after(self, nbytes: int | None) -> None:
        with self._lock:
            self._budget = nbytes

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self._down:
                client.close()
                continue
            try:
                up = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, up]
            threading.Thread(target=self._pump_requests, args=(client, up), daemon=True).start()
            threading.Thread(target=self._pump_responses, args=(up, client), daemon=True).start()

    def _pump_requests(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                drop = False
                for m in self._re.finditer(data):
                    r = self._range.search(m.group(0))
                    line = m.group(1).decode()
                    with self._lock:
                        self.requests.append((line, r.group(1).decode() if r else None))
                        f = self._fail
                        if f and f[0] in line:
                            if f[1] > 0:
                                f[1] -= 1
                            elif f[2] > 0:
                                f[2] -= 1
                                drop = True
                                self.dropped += 1
                if drop or self._down:
                    break
                dst.sendall(data)
        except OSError:
            pass
        self._close_pair(src, dst)

    def _pump_responses(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    budget = self._budget
                    if budget is not None and len(data) >= budget:
                        self._budget = None
                        self.cuts += 1
                        cut, data = True, data[:budget]
                    else:
                        cut = False
                        if budget is not None:
                            self._budget = budget - len(data)
                if data:
                    dst.sendall(data)
                if cut:
                    self.drop_all()
                    return
        except OSError:
            pass
        self._close_pair(src, dst)

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def drop_all(self) -> None:
        """Close every open connection now."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._srv.close()
        self.drop_all()


# ------------------------------------------------------------------------------------------------
# Shell entry point (tests/services.sh)
# ------------------------------------------------------------------------------------------------


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip().strip('"')
    return out


def _cli(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: services.py start|stop ENV_FILE", file=sys.stderr)
        return 2
    action, env_file = argv[0], Path(argv[1]).absolute()
    if action == "stop":
        if not env_file.exists():
            return 0
        env = _read_env(env_file)
        for pid in env.get("SEME_TEST_SERVICES_PIDS", "").split():
            if pid.isdigit():
                stop_pid(int(pid))
        if env.get("SEME_TEST_SERVICES_DIR", "").startswith(tempfile.gettempdir()):
            shutil.rmtree(env["SEME_TEST_SERVICES_DIR"], ignore_errors=True)
        env_file.unlink()
        return 0
    if env_file.exists():  # a previous run that was not stopped: stop it first
        _cli(["stop", str(env_file)])
    workdir = Path(tempfile.mkdtemp(prefix="seme-services-"))
    moto, s3_url = start_moto(log=workdir / "moto.log")
    try:
        mlf, mlflow_url = start_mlflow(s3_url, workdir)
    except BaseException:
        stop_pid(moto.pid)
        raise
    env_file.write_text(
        f"SEME_TEST_S3_ENDPOINT={s3_url}\nSEME_TEST_MLFLOW_URI={mlflow_url}\n"
        f'SEME_TEST_SERVICES_DIR={workdir}\nSEME_TEST_SERVICES_PIDS="{mlf.pid} {moto.pid}"\n'
    )
    print(f"moto S3 at {s3_url} (pid {moto.pid}); MLflow at {mlflow_url} (pid {mlf.pid}); logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
