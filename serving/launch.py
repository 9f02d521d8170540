"""Start `python -m serving.server` as a child process on a free loopback port and wait until it is healthy.

Used by the server tests and `bench/serve.py`; both need a real server process, not an in-process app.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if `process` has not exited after `timeout_s` seconds; reaps it either way."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_server(
    model: str | os.PathLike, args: Sequence[str] = (), log_path: str | os.PathLike | None = None,
    startup_timeout_s: float = 180.0, threads: int | None = None,
) -> Iterator[str]:
    """Yields the base URL (`http://127.0.0.1:PORT`) of a healthy server for `model`; stops it on exit.

    `args` are extra CLI flags; `threads` sets OMP_NUM_THREADS for the server. Raises RuntimeError with the tail of
    the server log when it exits or stays unhealthy for `startup_timeout_s` seconds.
    """
    import httpx

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "serving.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), *args]
    log_file = Path(log_path) if log_path else Path(os.devnull)
    base = f"http://127.0.0.1:{port}"
    with open(log_file, "ab") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def tail() -> str:
        return log_file.read_text(errors="replace")[-4000:] if log_path else "(no log file given)"

    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}:\n{tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not healthy after {startup_timeout_s:g} s:\n{tail()}")
            time.sleep(0.3)
        yield base
    finally:
        stop_process(process)
