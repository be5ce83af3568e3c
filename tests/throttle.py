"""A slow link for the tests: a TCP proxy that forwards at most `rate` bytes a second each way,
between one client (a pod) and a real server (the S3 store). Bytes really cross it; only their
pace is set, as a congested or degraded link sets it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from dpo_operator.local.kubelet import free_port

# Sent in slices a tenth of a second's worth, so the pace is even.
SLICES_PER_SECOND = 10


@dataclass
class ThrottledProxy:
    upstream_port: int
    rate: int
    port: int = field(default_factory=free_port)
    forwarded: int = 0
    connections: int = 0
    most_at_once: int = 0
    _listener: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.connections += 1
                self.most_at_once = max(self.most_at_once, self.connections)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counts: bool = False) -> None:
        """Forward one direction of a connection at the rate; the `counts` side ends it in
        the connection count."""
        piece = max(self.rate // SLICES_PER_SECOND, 1)
        with contextlib.suppress(OSError):
            while data := source.recv(piece):
                started = time.monotonic()
                sink.sendall(data)
                self.forwarded += len(data)
                time.sleep(max(len(data) / self.rate - (time.monotonic() - started), 0))
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        if counts:
            with self._lock:
                self.connections -= 1


@contextlib.contextmanager
def throttled(upstream_port: int, rate: int) -> Iterator[ThrottledProxy]:
    """A proxy to 127.0.0.1:`upstream_port` at `rate` bytes a second, for the block's length."""
    proxy = ThrottledProxy(upstream_port, rate)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
