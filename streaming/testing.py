"""Run ``whisper-stream serve`` in a child process, for tests and benchmarks.

The server tells the port it bound through ``--port-file`` (JSON), so nothing scrapes its log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


class ServerProcess:
    """``whisper-stream serve --port 0 ARGS`` in a child process; its output goes to ``log``.

    >>> with ServerProcess(["--model", "tiny.en"], Path("serve.log")) as server:
    ...     stream_to(server.url)
    """

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, timeout: float = 180.0):
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix="whisper-stream-")
        port_file = Path(self._dir.name) / "port.json"
        command = [sys.executable, "-m", "streaming.cli", "serve", "--port", "0", "--port-file", str(port_file),
                   *args]
        with open(self.log, "w") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                self._dir.cleanup()
                raise RuntimeError(f"the server did not start; its log ({self.log}):\n{self.log_text()}")
            time.sleep(0.05)
        self.address = json.loads(port_file.read_text())
        self.port: int = self.address["port"]
        self.url: str = self.address["url"]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def http_url(self) -> str:
        return f"http://{self.address['host']}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains its streams), then its exit code; killed after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._dir.cleanup()
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
