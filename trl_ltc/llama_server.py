"""llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`, the `server` extra) started for a GGUF file.

`local_llama_server(gguf)` runs `python -m llama_cpp.server` in a subprocess on a free local port, waits until it
answers and stops it on exit; `trl-ltc quickstart --teacher_server` and the tests use it with the embedded teacher's
GGUF (`trl_ltc.embedded.teacher_gguf`). The same server by hand:

    python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8000 --n_ctx 2048 --logits_all true
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

__all__ = ["LLAMA_SERVER_INSTALL", "llama_server_available", "local_llama_server"]

LLAMA_SERVER_INSTALL = "pip install 'trl-ltc[server]' (llama-cpp-python[server], built from source: ~5 min on 2 cores)"


def llama_server_available() -> bool:
    """Whether `llama_cpp.server` and its web dependencies are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "uvicorn", "fastapi"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_llama_server(gguf: str | Path, n_ctx: int = 2048, threads: int | None = None, startup_timeout: float = 180):
    """Serve `gguf` with llama.cpp's server on a free local port; yields its base URL, stops it on exit.

    `--logits_all true` keeps the logits of every prompt position, which its echoed log-probs need.
    """
    if not llama_server_available():
        raise RuntimeError(f"llama.cpp's server is not installed: {LLAMA_SERVER_INSTALL}.")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--logits_all", "true"]  # fmt: skip
    if threads is not None:
        command += ["--n_threads", str(threads)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"llama.cpp's server exited with code {process.returncode}:\n{tail}")
                try:
                    with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                        json.loads(response.read())
                    break
                except OSError as error:
                    if time.monotonic() > deadline:
                        message = f"llama.cpp's server did not answer at {url} within {startup_timeout:g} s"
                        raise RuntimeError(message) from error
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
