"""Talking to WireGuard devices: the cross-platform UAPI socket of a userspace
implementation (wireguard-go) and kernel generic netlink (pyroute2), behind one small
interface: `peers()`, `remove(public_key)`, `add(peer)`.

The UAPI protocol (https://www.wireguard.com/xplatform/) is newline-separated key=value
lines ended by an empty line; keys are hex there and base64 everywhere else here. The
kernel path needs pyroute2 (Debian: python3-pyroute2) and the wireguard module; it is
covered by unit tests of its conversions only where the kernel has no such module.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.enforce.base import EnforceError

UAPI_DIR = Path("/var/run/wireguard")
UAPI_TIMEOUT_S = 2.0
_ZERO_KEY = "0" * 64


class WireGuardError(EnforceError):
    """A WireGuard request was invalid or refused; nothing was changed."""


class NotWireGuard(WireGuardError):
    """The interface exists but is not a WireGuard device (or is not in this namespace)."""


@dataclass(frozen=True)
class Peer:
    """A peer's configuration, everything needed to put it back (keys in base64)."""

    public_key: str
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None          # "198.51.100.1:51820", "[2001:db8::1]:51820"
    persistent_keepalive_s: int = 0
    preshared_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "allowed_ips": list(self.allowed_ips),
                "endpoint": self.endpoint, "persistent_keepalive_s": self.persistent_keepalive_s,
                "preshared_key": self.preshared_key}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Peer":
        return cls(d["public_key"], tuple(d.get("allowed_ips", ())), d.get("endpoint"),
                   int(d.get("persistent_keepalive_s", 0)), d.get("preshared_key"))


def check_key(key: str) -> str:
    """A base64 WireGuard key (32 bytes) as given; WireGuardError otherwise."""
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise WireGuardError(f"not a WireGuard public key: {key!r} (expected 44 base64 characters)")
    return key.strip()


def _hex(key: str) -> str:
    return base64.b64decode(key).hex()


def _b64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


class Device(Protocol):
    name: str
    kind: str        # "userspace" | "kernel"

    def peers(self) -> list[Peer]: ...
    def remove(self, public_key: str) -> None: ...
    def add(self, peer: Peer) -> None: ...


# --- userspace: the UAPI socket ----------------------------------------------------------

def parse_uapi_peers(lines: list[tuple[str, str]]) -> list[Peer]:
    """Peers from the key=value pairs of a `get=1` answer (interface keys ignored, the
    private key included: it is never kept)."""
    peers: list[dict[str, Any]] = []
    for key, value in lines:
        if key == "public_key":
            peers.append({"public_key": _b64(value), "allowed_ips": []})
        elif not peers:
            continue
        elif key == "allowed_ip":
            peers[-1]["allowed_ips"].append(str(ipaddress.ip_network(value, strict=False)))
        elif key == "endpoint":
            peers[-1]["endpoint"] = value
        elif key == "persistent_keepalive_interval":
            peers[-1]["persistent_keepalive_s"] = int(value)
        elif key == "preshared_key" and value != _ZERO_KEY:
            peers[-1]["preshared_key"] = _b64(value)
    return [Peer.from_json(p) for p in peers]


def uapi_set_peer(peer: Peer) -> str:
    """The `set=1` request that (re)creates `peer` exactly (allowed IPs replaced)."""
    lines = ["set=1", f"public_key={_hex(peer.public_key)}"]
    if peer.preshared_key:
        lines.append(f"preshared_key={_hex(peer.preshared_key)}")
    if peer.endpoint:
        lines.append(f"endpoint={peer.endpoint}")
    lines += [f"persistent_keepalive_interval={peer.persistent_keepalive_s}", "replace_allowed_ips=true"]
    lines += [f"allowed_ip={ip}" for ip in peer.allowed_ips]
    return "\n".join(lines) + "\n\n"


class UapiDevice:
    """A userspace WireGuard device reached through `<uapi_dir>/<name>.sock`."""

    kind = "userspace"

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path

    def _request(self, text: str) -> list[tuple[str, str]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(UAPI_TIMEOUT_S)
            try:
                s.connect(str(self.path))
                s.sendall(text.encode())
                buf = b""
                while not buf.endswith(b"\n\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except OSError as e:
                raise WireGuardError(f"{self.name}: the WireGuard device does not answer: {e}") from None
        pairs = [tuple(ln.split("=", 1)) for ln in buf.decode().splitlines() if "=" in ln]
        errno_ = dict(pairs).get("errno", "0")
        if errno_ != "0":
            raise WireGuardError(f"{self.name}: the WireGuard device refused the request "
                                 f"({os.strerror(int(errno_))})")
        return pairs  # type: ignore[return-value]

    def peers(self) -> list[Peer]:
        return parse_uapi_peers(self._request("get=1\n\n"))

    def remove(self, public_key: str) -> None:
        self._request(f"set=1\npublic_key={_hex(public_key)}\nremove=true\n\n")

    def add(self, peer: Peer) -> None:
        self._request(uapi_set_peer(peer))


def uapi_device(name: str, uapi_dir: Path) -> UapiDevice | None:
    """The userspace device `name` if its socket's server runs in this network namespace.

    The socket directory is shared by all namespaces of the host, so a socket of the same
    name may belong to a device elsewhere: its server's (SO_PEERCRED) namespace decides."""
    path = uapi_dir / f"{name}.sock"
    if not path.is_socket():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(UAPI_TIMEOUT_S)
        try:
            s.connect(str(path))
            pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            theirs = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
    return UapiDevice(name, path) if theirs == os.stat("/proc/thread-self/ns/net").st_ino else None


# --- kernel: generic netlink through pyroute2 ---------------------------------------------

def kernel_peer_args(peer: Peer) -> dict[str, Any]:
    """pyroute2's `peer` mapping for WireGuard.set() that (re)creates `peer`."""
    args: dict[str, Any] = {"public_key": peer.public_key, "allowed_ips": list(peer.allowed_ips),
                            "persistent_keepalive": peer.persistent_keepalive_s}
    if peer.preshared_key:
        args["preshared_key"] = peer.preshared_key
    if peer.endpoint:
        host, _, port = peer.endpoint.rpartition(":")
        args["endpoint_addr"], args["endpoint_port"] = host.strip("[]"), int(port)
    return args


def kernel_peer(attrs: Any) -> Peer:
    """A Peer from one decoded pyroute2 WGDEVICE_A_PEERS entry."""
    def get(name: str) -> Any:
        return attrs.get_attr(name)

    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    ips = tuple(str(ipaddress.ip_network(ip["addr"], strict=False))
                for ip in (get("WGPEER_A_ALLOWEDIPS") or ()) if ip.get("addr"))
    ep = get("WGPEER_A_ENDPOINT")
    endpoint = None
    if ep and ep.get("addr") and ep.get("port"):
        addr = ep["addr"]
        endpoint = f"[{addr}]:{ep['port']}" if ":" in addr else f"{addr}:{ep['port']}"
    psk = get("WGPEER_A_PRESHARED_KEY")
    psk = text(psk) if psk else None
    if psk and not any(base64.b64decode(psk)):
        psk = None
    return Peer(text(get("WGPEER_A_PUBLIC_KEY")), ips, endpoint,
                int(get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0), psk)


class KernelDevice:
    """A kernel WireGuard device, through pyroute2's generic netlink socket (opened per
    request, in the calling thread's network namespace)."""

    kind = "kernel"

    def __init__(self, name: str):
        self.name = name

    def _socket(self) -> Any:
        from pyroute2 import WireGuard  # optional: only hosts with the kernel module need it

        return WireGuard()

    def peers(self) -> list[Peer]:
        with self._socket() as wg:
            msgs = wg.info(self.name)
        return [kernel_peer(p) for msg in msgs for p in (msg.get_attr("WGDEVICE_A_PEERS") or ())]

    def remove(self, public_key: str) -> None:
        with self._socket() as wg:
            wg.set(self.name, peer={"public_key": public_key, "remove": True})

    def add(self, peer: Peer) -> None:
        with self._socket() as wg:
            wg.set(self.name, peer=kernel_peer_args(peer))


def kernel_device(name: str) -> KernelDevice | None:
    """`name` as a kernel WireGuard device, or None (no pyroute2, no module, not WireGuard)."""
    if not Path("/sys/module/wireguard").is_dir():
        return None          # no kernel WireGuard (pyroute2 would log errors finding out)
    try:
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        return None
    dev = KernelDevice(name)
    try:
        dev.peers()
    except (NetlinkError, OSError):
        return None
    return dev


def open_device(name: str, uapi_dir: Path = UAPI_DIR) -> Device:
    """The WireGuard device `name` of this network namespace, its implementation detected:
    a UAPI socket served from this namespace, else kernel netlink."""
    if name not in {n for _, n in socket.if_nameindex()}:
        raise WireGuardError(f"no interface named {name!r} in this network namespace")
    dev: Device | None = uapi_device(name, uapi_dir) or kernel_device(name)
    if dev is None:
        raise NotWireGuard(f"{name} is not a WireGuard interface")
    return dev
