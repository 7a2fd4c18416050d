"""A TCP proxy on loopback in front of a real server (the moto S3 server), which a test can make
stall (connections stay open, no byte moves either way) or die (every connection reset, new ones
refused): what a storage endpoint does to a run on a bad day."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class FlakyProxy:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall(self) -> None:
        self.mode = "stall"

    def die(self) -> None:
        """Refuse new connections and reset the open ones (SO_LINGER 0: an RST, not a clean close)."""
        self.mode = "dead"
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()

    close = die

    def _accept(self) -> None:
        while self.mode != "dead":
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                while self.mode == "stall":
                    time.sleep(0.05)  # hold everything: the peer waits on an open, silent connection
                data = src.recv(65536)
                if not data or self.mode == "dead":
                    break
                while self.mode == "stall":
                    time.sleep(0.05)
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
