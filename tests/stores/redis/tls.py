"""Throwaway TLS for Redis tests: a CA and a server certificate for 127.0.0.1 (made with
the ``openssl`` command), and the ``redis-server`` options that serve TLS only."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path

    def server_options(self, port: int) -> list[str]:
        """``redis-server`` options: TLS on ``port``, no plain port, clients unchecked
        (the servers' replication and cluster bus over TLS too)."""
        return [
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
            "--tls-replication", "yes", "--tls-cluster", "yes",
        ]  # fmt: skip

    def query(self) -> str:
        """What a client's URL adds to trust the CA."""
        return f"ssl_ca_certs={self.ca}"


def certificates(
    folder: Path, names: tuple[str, ...] = ("IP:127.0.0.1", "DNS:localhost")
) -> Certificates:
    """A CA, and a certificate it signed for ``names`` (subjectAltName entries), in
    ``folder``."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is missing (apt-get install openssl)"
    folder.mkdir(parents=True, exist_ok=True)
    made = Certificates(folder / "ca.crt", folder / "server.crt", folder / "server.key")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=statescale-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (folder / "ext.cnf").write_text(f"subjectAltName={','.join(names)}\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf")  # fmt: skip
    return made
