"""`sidrec serve` as a child process: what load tests, benchmarks and deployment scripts need to
start a server on a free port of 127.0.0.1, learn its URL and stop it gracefully."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class ServerProcess:
    """Start `sidrec serve RUN --port 0 *args`; `url` is read from the line the server prints once it
    listens. `stop()` sends SIGTERM (in-flight requests finish) and returns the exit status."""

    def __init__(self, run: str | Path, *args: str, timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "sidrec.cli", "serve", str(run), "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []  # what the server printed (drained all along: a full pipe would block it)
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return
        self.proc.kill()
        raise RuntimeError(f"sidrec serve did not start: {' '.join(self.stderr[-5:]).strip()}")

    def _drain(self, lines: "queue.Queue[str]") -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            lines.put(line)

    def stop(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
