"""The local control socket: root-only access to the gRPC server, checked per connection.

gRPC's Python server does not expose a connection's peer credentials, so the server
listens on a private socket (in a 0700 directory) and this front owns the public path
<run_dir>/control.sock (0600): it reads SO_PEERCRED of every accepted connection, closes
it at once unless the peer runs as uid 0, and otherwise relays bytes both ways. The
relay is byte-for-byte, so HTTP/2 streams (watch included) pass through unchanged.

Each relayed connection reaches the private socket from an abstract unix address with a
random name, which the front registers in `peers` (as gRPC names the peer,
"unix-abstract:<name>") with the caller's uid and pid for as long as it lives. The
server's Authenticator accepts a local call only from a registered peer, so a process that
connects to the private socket directly (root, or anyone if its directory is loosened)
skipped the credential check and is refused. The name cannot be taken over: the front
holds the address while the connection lives and unregisters it before closing.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
from pathlib import Path

from agent.control.auth import LocalPeer

log = logging.getLogger("swarm_agent")

_UCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid
_CHUNK = 64 * 1024


class SocketInUse(RuntimeError):
    """Another live process answers on the socket path."""


def claim_path(path: Path) -> None:
    """Remove a stale socket left by a dead agent; raise SocketInUse for a live one."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)   # nobody listens: stale
        return
    finally:
        probe.close()
    raise SocketInUse(f"another agent is already listening on {path}")


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of a unix socket's peer, from the kernel (SO_PEERCRED)."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _UCRED.size))
    return pid, uid


class LocalFront:
    """Serves `public` for peers whose uid is in `allowed_uids`, relaying to `backend`.
    `refused` counts connections closed for their credentials; `peers` maps each relayed
    connection's gRPC peer string to its LocalPeer."""

    def __init__(self, public: Path, backend: Path, allowed_uids: tuple[int, ...] = (0,)):
        self.public, self.backend, self.allowed_uids = public, backend, allowed_uids
        self.refused = 0
        self.peers: dict[str, LocalPeer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[asyncio.Task] = set()

    async def start(self) -> None:
        claim_path(self.public)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.public))
        # The run_dir's permissions and this mode keep others from connecting at all;
        # the credential check below holds even if someone loosens them.
        os.chmod(self.public, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._relays):
            task.cancel()
        self.public.unlink(missing_ok=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid = peer_uid(writer.get_extra_info("socket"))
        if uid not in self.allowed_uids:
            self.refused += 1
            log.warning("control socket: refused a connection", extra={"pid": pid, "uid": uid})
            writer.close()
            return
        name = f"swarm-agent-control-{secrets.token_hex(16)}"   # no character to escape
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.bind("\0" + name)
            up.setblocking(False)
            await asyncio.get_running_loop().sock_connect(up, str(self.backend))
            up_reader, up_writer = await asyncio.open_unix_connection(sock=up)
        except OSError as e:
            up.close()
            log.error("control socket: backend unavailable", extra={"error": str(e)})
            writer.close()
            return
        key = "unix-abstract:" + name
        self.peers[key] = LocalPeer(pid, uid)
        task = asyncio.current_task()
        self._relays.add(task)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._relays.discard(task)
            self.peers.pop(key, None)     # before the address is released
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or a broken connection, then half-close the other side."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
