"""Start and stop Azurite's blob service for the Azure ML tests (installed by scripts/install-azurite.sh)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_BIN = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "azurite-blob"


def find_azurite() -> str | None:
    """``$AZURITE_BLOB``, then the copy scripts/install-azurite.sh puts under .ci/node, then PATH."""
    for candidate in (os.environ.get("AZURITE_BLOB"), str(LOCAL_BIN), shutil.which("azurite-blob")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Azurite:
    """One in-memory Azurite blob service over HTTPS on a free loopback port."""

    def __init__(self, binary: str, cert: Path, key: Path, workdir: Path) -> None:
        self.port = _free_port()
        self.log = workdir / "azurite.log"
        workdir.mkdir(parents=True, exist_ok=True)
        # --skipApiVersionCheck: the SDK speaks a newer API version than 3.35 knows; --disableTelemetry: offline.
        command = [
            binary,
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--cert", str(cert),
            "--key", str(key),
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"azurite-blob exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"azurite-blob did not listen on {self.port} within 30 s: {self.log.read_text()}")

    @property
    def account_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/devstoreaccount1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
