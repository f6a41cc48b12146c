"""Traffic helpers for the nftables tests: banner listeners started with `ip netns exec`
(killed on exit) and bounded in-process connects from a chosen namespace."""
from __future__ import annotations

import contextlib
import socket
import sys
from typing import Iterator

from swarmlab.lab import netns, serving, wait_for

_LISTENER = r"""
import socket, sys
addr, port, banner = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.sendall(banner)
"""


@contextlib.contextmanager
def listener(ns: str, addr: str, port: int, banner: str = "ok") -> Iterator[None]:
    """A TCP server in `ns` on addr:port that sends `banner` to each client; killed after."""
    with serving(ns, sys.executable, "-c", _LISTENER, addr, str(port), banner):
        yield


def connect(ns: str, addr: str, port: int, timeout_s: float = 1.0, src: str | None = None) -> str | None:
    """The banner read from addr:port by a client in `ns`, or None if the handshake failed."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns(ns):
        s = socket.socket(fam, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout_s)
        try:
            if src:
                s.bind((src, 0))
            s.connect((addr, port))
            return s.recv(64).decode()
        except OSError:
            return None


def reaches(ns: str, addr: str, port: int, src: str | None = None) -> bool:
    """Whether a client in `ns` gets through; a blocked handshake costs timeout_s."""
    return connect(ns, addr, port, 0.5, src) is not None


def wait_reaches(ns: str, addr: str, port: int, expected: bool, timeout_s: float = 5.0,
                 src: str | None = None) -> None:
    wait_for(lambda: reaches(ns, addr, port, src) == expected, timeout_s)
