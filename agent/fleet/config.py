"""The `fleet:` config section: fleet decisions the agent receives over NATS JetStream
(agent/fleet/subscriber.py) and the proposals it makes to the mesh.

No `nats_url`: the feature is off (nothing connects, nothing is proposed unless `propose`
is set explicitly and a mesh endpoint is configured). Numeric ranges are declared in
agent/configcheck.py BOUNDS (keys "fleet.*"); `check()` adds what one key cannot say.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from agent import configcheck
from agent.fleet.decision import MAX_LIFETIME_S

SCHEMES = ("nats://", "tls://")


@dataclass(frozen=True)
class FleetConfig:
    nats_url: str | None = None        # "nats://host:4222" (or tls://); null: fleet off
    nats_urls: tuple[str, ...] = ()    # further servers of the same cluster
    user: str | None = None            # NATS user (with password or password_file)
    password: str | None = None
    password_file: str | None = None   # the password, read at start (first line)
    tls_ca: str | None = None          # CA of the NATS server's certificate (PEM)
    tls_cert: str | None = None        # client certificate for NATS mutual TLS (PEM)
    tls_key: str | None = None
    keys: tuple[str, ...] = ()         # Ed25519 public keys (PEM files) the agent trusts
    max_lifetime_s: float = MAX_LIFETIME_S   # longer decisions are refused
    propose: bool | None = None        # null: true when mesh.endpoint is set
    max_prefix_v4: int = 16            # wider IPv4 networks are refused, whoever signed
    max_prefix_v6: int = 32
    reconnect_initial_s: float = 0.5   # first reconnect delay, doubled per failure
    reconnect_max_s: float = 30.0      # cap (equal jitter below it)
    batch_max: int = 200_000           # decisions applied in one transaction at most
    refusals_kept: int = 1000          # refused decisions kept for `swarm-agent fleet --refused`

    @property
    def enabled(self) -> bool:
        return self.nats_url is not None

    @property
    def servers(self) -> list[str]:
        return [u for u in (self.nats_url, *self.nats_urls) if u]

    def server_hosts(self) -> list[str]:
        """The host part of every server URL ("198.51.100.20", "nats.example", "::1")."""
        hosts = []
        for url in self.servers:
            try:
                host = urlsplit(url).hostname
            except ValueError:
                host = None
            if host:
                hosts.append(host)
        return hosts

    def proposing(self, mesh_endpoint: str | None) -> bool:
        """Whether blocks become proposals: `propose`, or by default whenever there is a
        mesh to send them to."""
        if mesh_endpoint is None:
            return False
        return True if self.propose is None else self.propose

    def check(self, mesh_endpoint: str | None) -> None:
        """What one key cannot say; raises ValueError with one sentence."""
        for url in self.servers:
            if not url.startswith(SCHEMES) or "://" not in url or not url.split("://", 1)[1]:
                raise ValueError(f"fleet.nats_url: {url[:80]!r} is not a nats:// or tls:// URL")
        if self.nats_urls and self.nats_url is None:
            raise ValueError("fleet.nats_urls needs fleet.nats_url (the feature is off without it)")
        if self.propose and mesh_endpoint is None:
            raise ValueError("fleet.propose needs mesh.endpoint (proposals go to the mesh)")
        if not self.enabled:
            return
        if not self.keys:
            raise ValueError("fleet.keys must list at least one public key file when "
                             "fleet.nats_url is set (decisions are verified, never trusted)")
        for key in ("tls_ca", "tls_cert", "tls_key", "password_file"):
            path = getattr(self, key)
            if path is not None and not configcheck.exists(path, "file"):
                raise ValueError(f"fleet.{key}: {path} does not exist")
        for path in self.keys:
            if not configcheck.exists(path, "file"):
                raise ValueError(f"fleet.keys: {path} does not exist")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("fleet.tls_cert and fleet.tls_key go together")
        if self.password is not None and self.password_file is not None:
            raise ValueError("fleet.password and fleet.password_file: give one of them")
        if (self.password is not None or self.password_file is not None) and self.user is None:
            raise ValueError("fleet.password needs fleet.user")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("fleet.reconnect_max_s must not be below fleet.reconnect_initial_s")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RESOLVE_WAIT_S = 3.0       # names of NATS servers resolved at start, waited for this long


def server_networks(hosts: list[str], resolve: Callable[..., Any] = socket.getaddrinfo,
                    wait_s: float = RESOLVE_WAIT_S) -> tuple[list[Network], list[str]]:
    """The addresses of the fleet's NATS servers (one /32 or /128 each), and the names
    that did not resolve. An address is taken as written; a name is resolved once, with
    every address it has, waiting at most `wait_s` in all (a hung resolver must not hold
    the agent's start; the address it connects to is added when it connects)."""
    nets: list[Network] = []
    names: list[str] = []
    for host in hosts:
        try:
            nets.append(ipaddress.ip_network(host))
        except ValueError:
            names.append(host)
    if not names:
        return nets, []
    found: dict[str, list[Network]] = {}

    def lookup() -> None:
        for name in names:
            try:
                infos = resolve(name, None, 0, socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                continue
            found[name] = [ipaddress.ip_network(i[4][0].split("%", 1)[0]) for i in infos]
    worker = threading.Thread(target=lookup, name="fleet-resolve", daemon=True)
    worker.start()
    worker.join(wait_s)
    for name in names:
        nets.extend(found.get(name, ()))
    return nets, [n for n in names if n not in found]


BOUNDS_HELP: dict[str, tuple[float, float]] = {
    "fleet.max_lifetime_s": (1, MAX_LIFETIME_S),
    "fleet.max_prefix_v4": (1, 32),
    "fleet.max_prefix_v6": (1, 128),
    "fleet.reconnect_initial_s": (0.01, 3600),
    "fleet.reconnect_max_s": (0.01, 86400),
    "fleet.batch_max": (1, 10_000_000),
    "fleet.refusals_kept": (1, 1_000_000),
}


def describe(cfg: FleetConfig) -> dict[str, Any]:
    """For status: where the agent listens, without secrets."""
    return {"servers": cfg.servers, "keys": list(cfg.keys), "user": cfg.user or ""}
