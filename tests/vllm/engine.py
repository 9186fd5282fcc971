"""A real vLLM CPU engine as a child process, for the tests under the ``vllm`` marker.

Owns the command line from the fact sheet (/work/shared/specs/vllm-engine.md), free
loopback ports, the log file, waiting on ``/health`` with a bounded timeout, and
stopping the whole process group (vLLM spawns an engine-core child). It refuses to
own any router logic: tests compare the router's code against what this engine says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.servers import env_without_proxies, free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
SERVED_MODEL = "tiny"
BLOCK_SIZE = 32  # the CPU attention backend accepts only multiples of 32
NUM_BLOCKS = 64  # small, so evictions are easy to force in the events tests
STARTUP_TIMEOUT_S = 240.0  # 30-45 s on an idle 2-core machine; 90-150 s seen while other suites ran beside it


def missing_venv_message() -> str:
    return (
        f"{VLLM_PYTHON} not found: the real-vLLM tests (marker 'vllm') need vLLM's CPU build. "
        "Run ./scripts/setup-vllm first (CI's .ci/run does), or deselect them with -m 'not vllm'."
    )


@dataclass
class VllmEngine:
    """One ``vllm.entrypoints.openai.api_server`` process with prefix caching and KV events on."""

    model_dir: Path
    log_path: Path
    topic: str = "kv"
    omp_threads_bind: str | None = None  # "0" / "1" when two engines share 2 cores
    port: int = field(default_factory=free_port)
    events_port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    startup_s: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events_endpoint(self) -> str:
        """Where the engine's PUB socket *connects*: the subscriber binds it (fact sheet: tcp://IP connects)."""
        return f"tcp://127.0.0.1:{self.events_port}"

    @property
    def replay_endpoint(self) -> str:
        """The engine's replay ROUTER socket, which the engine binds."""
        return f"tcp://127.0.0.1:{self.replay_port}"

    def command(self) -> list[str]:
        kv_events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.events_endpoint,
            "replay_endpoint": self.replay_endpoint,
            "topic": self.topic,
        }
        return [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", SERVED_MODEL,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "bfloat16", "--max-model-len", "1024",
            "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(NUM_BLOCKS),
            "--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256",
            "--enable-prompt-tokens-details", "--enforce-eager",
            "--kv-events-config", json.dumps(kv_events),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = env_without_proxies()
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_SERVER_DEV_MODE="1",  # adds POST /reset_prefix_cache
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        if self.omp_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.omp_threads_bind
        return env

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Start and wait until /health answers 200; returns the start-up time in seconds."""
        if not VLLM_PYTHON.exists():
            raise RuntimeError(missing_venv_message())
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {' '.join(self.command())}\n".encode())
            log.flush()
            # A new session, so stop() can end the engine-core child with its parent.
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                cwd=str(self.log_path.parent), start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = began + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"vLLM exited with {self.proc.returncode} during start-up\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        elapsed = time.monotonic() - began
                        self.startup_s.append(elapsed)
                        return elapsed
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not answer /health within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        pgid = proc.pid  # start_new_session: the group id is the child's pid
        os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(10)
        # The engine-core child may outlive its parent by a moment; make sure the group is gone.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def restart(self) -> float:
        """Stop and start again on the same ports: an empty cache and event sequence back at 0."""
        self.stop()
        return self.start()

    def reset_prefix_cache(self, timeout: float = 10.0) -> None:
        """Empty the prefix cache. vLLM refuses (``success: false``) while a finished request's
        blocks are not freed yet, which can lag its HTTP answer by a moment: retry until it takes."""
        deadline = time.monotonic() + timeout
        while True:
            response = httpx.post(f"{self.url}/reset_prefix_cache", timeout=30.0)
            response.raise_for_status()
            if response.json().get("success", True):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM kept refusing /reset_prefix_cache for {timeout:.0f} s")
            time.sleep(0.05)

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if pytest dies (killed by a CI timeout), so no 2 GB engine lingers."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def build_tiny_model(cache_root: Path) -> Path:
    """The tiny model directory, built once per content of its inputs (script and tokenizer files)."""
    import hashlib

    from tests.vllm.make_tiny_model import SIM_MODEL, TOKENIZER_FILES

    digest = hashlib.sha256(Path(__file__).with_name("make_tiny_model.py").read_bytes())
    for name in TOKENIZER_FILES:
        digest.update((SIM_MODEL / name).read_bytes())
    target = cache_root / f"tiny-llama-{digest.hexdigest()[:12]}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = cache_root / f"{target.name}.tmp{os.getpid()}"
    result = subprocess.run(
        [str(VLLM_PYTHON), str(Path(__file__).with_name("make_tiny_model.py")), str(staging)],
        capture_output=True, text=True, timeout=300, env=env_without_proxies(),
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"building the tiny model failed:\n{result.stdout}\n{result.stderr}")
    staging.rename(target)
    return target


if __name__ == "__main__":  # manual use: python -m tests.vllm.engine  (starts one engine, prints its URL)
    model = build_tiny_model(VLLM_VENV / "test-models")
    engine = VllmEngine(model, Path("/tmp/vllm-engine.log"))
    print(f"started in {engine.start():.1f} s at {engine.url}", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    finally:
        engine.stop()
