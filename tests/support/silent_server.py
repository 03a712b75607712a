"""A loopback TCP server that accepts connections and never answers: a bucket that stalls.

It records every connection it accepts (so a test can also assert that nothing dialled it), and
``wait_closed_by_peer`` tells whether the client side has hung up. Every wait is bounded;
``close()`` stops the thread and closes every socket.
"""

from __future__ import annotations

import socket
import threading
import time

HOST = "127.0.0.1"
MAX_WAIT_S = 10.0


class SilentServer:
    def __init__(self) -> None:
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://{HOST}:{self.port}"
        self._lock = threading.Lock()
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._accepted)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._accepted.append(conn)

    def wait_connections(self, count: int, timeout: float = MAX_WAIT_S) -> bool:
        end = time.monotonic() + timeout
        while self.connections < count:
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def wait_closed_by_peer(self, timeout: float = MAX_WAIT_S) -> bool:
        """True once every accepted connection reads end-of-file (whatever was sent first)."""
        end = time.monotonic() + timeout
        with self._lock:
            pending = list(self._accepted)
        for conn in pending:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                conn.settimeout(left)
                try:
                    if not conn.recv(65536):
                        break
                except TimeoutError:
                    return False
                except OSError:  # reset by the peer: closed as well
                    break
        return True

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=MAX_WAIT_S)
        with self._lock:
            for conn in self._accepted:
                conn.close()
