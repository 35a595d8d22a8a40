"""A TCP proxy that delays every byte by a fixed time each way: a Redis "on another
machine" for the benchmark's remote-store runs. Loopback only; not for production.

Threads and ``time.sleep`` rather than an event loop's timers: those wait in whole
milliseconds (epoll), so 0.5 ms each way became a round trip of about 2.4 ms.
:meth:`DelayProxy.round_trip` measures what a round trip through it really costs."""

from __future__ import annotations

import contextlib
import queue
import socket
import statistics
import threading
import time

_END = b""


class DelayProxy:
    """Forwards 127.0.0.1:``port`` to ``target``, ``delay`` seconds each way (so a round
    trip costs about twice that more). Order is kept: each chunk goes on ``delay``
    after it arrived, in the order it came. Threads of its own."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False

    def start(self) -> DelayProxy:
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def round_trip(self, pings: int = 50) -> float:
        """The median seconds of a Redis ``PING`` through the proxy."""
        times = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(pings):
                started = time.perf_counter()
                conn.sendall(b"PING\r\n")
                if not conn.recv(64).startswith(b"+PONG"):
                    raise RuntimeError("the delayed Redis did not answer PONG")
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                if self._closed:
                    return
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    chunks.put((time.monotonic() + self.delay, data))
            chunks.put((time.monotonic() + self.delay, _END))

        def write() -> None:
            while True:
                due, data = chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if data is _END:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, name="delay-proxy-read", daemon=True).start()
        threading.Thread(target=write, name="delay-proxy-write", daemon=True).start()
