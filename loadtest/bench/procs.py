"""Child processes for benchmarks: started, waited for, always stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

LOG_DIR_ENV = "LOADTEST_LOG_DIR"
"""A directory: every benchmark child's stderr is kept there (a file each) instead of discarded."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """``with Proc([...]) as p:`` runs a command for the block's duration, then ends it."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.args = args
        self.env = dict(env) if env is not None else None
        self.popen: subprocess.Popen[bytes] | None = None
        # stderr goes to a file, never a pipe: a chatty child (a log line per request)
        # would fill an unread pipe and block mid-benchmark. LOADTEST_LOG_DIR keeps them.
        keep = os.environ.get(LOG_DIR_ENV)
        if keep:
            name = f"{Path(args[0]).name}-{'-'.join(a for a in args[1:4] if not a.startswith('/'))}"
            self._stderr = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in __exit__
                dir=keep, prefix=name.replace("/", "_")[:60] + "-", suffix=".log", delete=False)
        else:
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> Proc:
        self.popen = subprocess.Popen(self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=self._stderr)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stderr_tail(self) -> str:
        if self.popen is None or self.alive():
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.popen is None:
            return
        self._close()

    def _close(self) -> None:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._stderr.close()


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by a process and its children; None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue  # a worker that just exited
        total += t.user + t.system
    return total


def wait_http(url: str, *, proc: Proc | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"process exited before {url} answered:\n{proc.stderr_tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status < 500:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def install_debian(commands: Mapping[str, str]) -> None:
    """apt-get install the packages whose command is missing (as root); else say what to install."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    apt = ["apt-get", "install", "-y", "-qq", *missing]
    if shutil.which("apt-get") is None or not _is_root():
        raise SystemExit(f"missing {', '.join(missing)}: install with sudo {' '.join(apt)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(apt, check=True, env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def _is_root() -> bool:
    import os

    return os.geteuid() == 0
