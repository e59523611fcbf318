"""`sidrec serve` as a child process: what load tests, benchmarks and deployment scripts need to
start a server on a free port of 127.0.0.1, learn its URL and stop it gracefully."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """Start `sidrec serve RUN --port 0 *args`; `url` is read from the line the server prints once it
    listens. `stop()` sends SIGTERM (in-flight requests finish) and returns the exit status."""

    def __init__(self, run: str | Path, *args: str, timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "sidrec.cli", "serve", str(run), "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline, line = time.time() + timeout, ""
        while time.time() < deadline and self.proc.poll() is None:
            line = self.proc.stderr.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return
        self.proc.kill()
        raise RuntimeError(f"sidrec serve did not start: {line.strip()} {self.proc.stderr.read().strip()}")

    def stop(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
