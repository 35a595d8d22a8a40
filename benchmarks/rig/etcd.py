"""A throwaway single-member etcd (Debian's ``etcd-server``) on free loopback ports, with
its data in a temporary directory: for the registry's tests and benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from statescale.processes import free_port, stop_process


class EtcdServer:
    """``with EtcdServer() as etcd: etcd.url`` (``etcd://127.0.0.1:PORT``)."""

    def __init__(self) -> None:
        self.port, self.peer_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.data = Path(tempfile.mkdtemp(prefix="etcd-"))

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd is not installed: apt-get install etcd-server")
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        command = [
            etcd,
            "--name=test",
            f"--data-dir={self.data / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--log-level=error",
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as answer:
                    if b'"true"' in answer.read():
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not come up in {timeout}s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10)
            self.process = None
        shutil.rmtree(self.data, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
