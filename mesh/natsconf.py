"""The nats-server configuration of a fleet: JetStream on disk and two roles.

- the mesh user publishes decisions (swarm.decisions.>) and drives the JetStream API
  ($JS.API.>: it creates and updates the stream SWARM_DECISIONS); its replies come on its
  own inbox prefix `_INBOX_MESH`, which no node may subscribe to;
- node users only read. They may create EPHEMERAL consumers on SWARM_DECISIONS, read the
  stream's info and single messages, answer flow control, and subscribe on `_INBOX.>`
  (where their consumers deliver; not on swarm.> itself). They publish nothing on
  swarm.> and cannot create, update, delete or purge streams, delete messages or delete
  or list consumers (denied explicitly as well as by the allow list).

THE AGENT'S CONSUMER RECIPE (checked against nats-server 2.9.10 in
tests/integration/test_mesh_nats.py, which runs it as a node user):

    nc = await nats.connect(url, user=..., password=..., tls=..., inbox_prefix="_INBOX")
    js = nc.jetstream()
    info = await js.stream_info("SWARM_DECISIONS")   # $JS.API.STREAM.INFO.SWARM_DECISIONS
    # reset check: info.state.last_seq < our last applied seq, or info.created changed
    sub = await js.subscribe("swarm.decisions.>", stream="SWARM_DECISIONS",
                             ordered_consumer=True, idle_heartbeat=5,
                             deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                             config=ConsumerConfig(opt_start_seq=last_applied + 1))
    # or deliver_policy=DeliverPolicy.ALL to load the whole stream (the snapshot)
    msg.metadata.sequence.stream is the seq to persist once the decision is applied.

Pass `stream=` always: without it nats-py asks $JS.API.STREAM.NAMES, which nodes may not.
Never pass `durable=` or `config.name`: only $JS.API.CONSUMER.CREATE.SWARM_DECISIONS (the
ephemeral form) is allowed. Do not set inactive_threshold above 60 s (leave it unset:
nats-server gives ephemeral consumers 5 s).

CONSUMERS THAT OUTLIVE THEIR NODE. The ephemeral form still lets a node ask for a pull
consumer, a push consumer delivering anywhere, or an inactive_threshold of a year, and
leave it behind. nats-server 2.9.10 has nothing to stop that per user: no per-user consumer
limit (only accounts have JetStream limits, and an account-wide or a stream's
max_consumers is shared by the whole fleet, so one node could fill it and lock the honest
ones out), no cap on a consumer's inactive_threshold (the stream's consumer_limits came in
2.10). So the mesh reaps them: while connected, its publisher (mesh/publish.py) lists
SWARM_DECISIONS' consumers every 2 s as the mesh user and deletes every durable or pull
consumer, every one delivering outside `_INBOX.`, and every one whose inactive_threshold is
unset or over NODE_CONSUMER_MAX_IDLE_S (60 s); nats-server removes the rest by itself
within that long of their node going away. A node still connected can keep consumers
bound to its inbox alive while it stays connected; that ends when it disconnects (or its
user is removed from this config).

Nodes share the `_INBOX.>` prefix here, so one node could subscribe to another's delivery
subjects (it can read the decisions anyway: they are the same for every node). Giving
each node user its own prefix (`_INBOX.<user>.>`, inbox_prefix=f"_INBOX.{user}" in the
agent) would close that; it needs the agent to pass its prefix first.
The ordered consumer recreates itself (same subject) after missed heartbeats or a gap;
its flow-control replies go to $JS.FC.SWARM_DECISIONS.>. A single target's latest
decision: js.get_last_msg("SWARM_DECISIONS", subject) ($JS.API.STREAM.MSG.GET...).
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from agent.fleet.decision import STREAM, SUBJECT_PREFIX

MESH_INBOX = "_INBOX_MESH"
NODE_INBOX = "_INBOX"
ROLES = ("mesh", "node")
_SAFE = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")


def _mesh_permissions() -> dict[str, dict[str, list[str]]]:
    return {"publish": {"allow": [f"{SUBJECT_PREFIX}.>", "$JS.API.>"]},
            "subscribe": {"allow": [f"{MESH_INBOX}.>"]}}


def _node_permissions() -> dict[str, dict[str, list[str]]]:
    return {
        "publish": {
            "allow": [f"$JS.API.CONSUMER.CREATE.{STREAM}",
                      f"$JS.API.CONSUMER.INFO.{STREAM}.*",
                      f"$JS.API.STREAM.INFO.{STREAM}",
                      f"$JS.API.STREAM.MSG.GET.{STREAM}",
                      f"$JS.FC.{STREAM}.>"],
            "deny": ["swarm.>", "_INBOX.>", f"{MESH_INBOX}.>",
                     "$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>",
                     "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>",
                     "$JS.API.STREAM.MSG.DELETE.>", "$JS.API.CONSUMER.DELETE.>",
                     "$JS.API.CONSUMER.DURABLE.>", "$JS.API.CONSUMER.LIST.>",
                     "$JS.API.CONSUMER.NAMES.>"],
        },
        # Not swarm.decisions.> itself: a core subscription there would show the reply
        # subjects of the mesh's publishes (its inbox), which a consumer's deliver subject
        # (not checked against permissions by the server) could then be pointed at.
        "subscribe": {"allow": [f"{NODE_INBOX}.>"],
                      "deny": [f"{MESH_INBOX}.>", "swarm.>"]},
    }


PERMISSIONS = {"mesh": _mesh_permissions, "node": _node_permissions}


@dataclass(frozen=True)
class User:
    """A NATS login: a name, its password and its role ("mesh" or "node")."""
    name: str
    password: str
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"NATS user {self.name!r} has role {self.role!r}, not mesh or node")
        for what, value in (("name", self.name), ("password", self.password)):
            if not _SAFE.match(value):
                raise ValueError(f"NATS user {what} {value!r} must be 1-128 letters, digits or ._~-")


@dataclass(frozen=True)
class ServerSettings:
    """Where and how nats-server listens and stores. TLS is on when cert and key are given;
    with `tls_ca` as well, clients must present a certificate that CA signed."""
    store_dir: str
    host: str = "0.0.0.0"
    port: int = 4222
    server_name: str = "swarm-mesh"
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    http_port: int = 0                  # monitoring endpoint (0: off)
    max_file_store: str = "10G"
    max_memory_store: str = "1G"        # ordered consumers keep their state in memory
    max_payload: int = 1 << 20
    max_connections: int = 0            # 0: the server's default (unlimited)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (0 < self.port < 65536):
            raise ValueError(f"NATS port {self.port} is not between 1 and 65535")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("NATS TLS needs both a certificate and a key")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("NATS client verification (tls_ca) needs a server certificate")


def new_password() -> str:
    """A random password that needs no quoting in the config (32 url-safe characters)."""
    return secrets.token_urlsafe(24)


def _q(value: str) -> str:
    if '"' in value or "\\" in value or "\n" in value:
        raise ValueError(f"{value!r} cannot be written into a nats-server config")
    return f'"{value}"'


def _list(items: list[str]) -> str:
    return "[" + ", ".join(_q(i) for i in items) + "]"


def _permissions_block(role: str, indent: str) -> str:
    lines = [f"{indent}permissions: {{"]
    for direction, rules in PERMISSIONS[role]().items():
        inner = ", ".join(f"{k}: {_list(v)}" for k, v in rules.items())
        lines.append(f"{indent}  {direction}: {{ {inner} }}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def render(settings: ServerSettings, users: list[User]) -> str:
    """The nats-server configuration text."""
    if not any(u.role == "mesh" for u in users):
        raise ValueError("the NATS configuration needs a mesh user")
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise ValueError("NATS user names must be unique")
    s = settings
    out = ["# swarm-mesh: nats-server configuration (written by mesh.natsconf; edits are lost)",
           f"server_name: {_q(s.server_name)}",
           f"listen: {_q(f'{s.host}:{s.port}')}",
           f"max_payload: {s.max_payload}"]
    if s.max_connections:
        out.append(f"max_connections: {s.max_connections}")
    if s.http_port:
        out.append(f"http: {_q(f'127.0.0.1:{s.http_port}')}")
    out += ["jetstream {", f"  store_dir: {_q(s.store_dir)}",
            f"  max_file_store: {_q(s.max_file_store)}",
            f"  max_memory_store: {_q(s.max_memory_store)}", "}"]
    if s.tls_cert:
        out += ["tls {", f"  cert_file: {_q(s.tls_cert)}", f"  key_file: {_q(s.tls_key)}"]
        if s.tls_ca:
            out += [f"  ca_file: {_q(s.tls_ca)}", "  verify: true"]
        out += ["  timeout: 2", "}"]
    for key, value in s.extra.items():
        out.append(f"{key}: {value}")
    out += ["authorization {", "  users: ["]
    for u in users:
        out += ["    {", f"      user: {_q(u.name)}", f"      password: {_q(u.password)}",
                _permissions_block(u.role, "      "), "    }"]
    out += ["  ]", "}", ""]
    return "\n".join(out)


def write(path: str | Path, settings: ServerSettings, users: list[User]) -> Path:
    """Writes the configuration 0600 (it holds passwords), atomically."""
    path = Path(path)
    text = render(settings, users)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_fleet(directory: str | Path, settings: ServerSettings,
                nodes: tuple[str, ...] = ("node",)) -> dict[str, Path]:
    """A fleet's NATS files in `directory`: nats.conf and one `<user>.password` per user
    (the mesh user "mesh" and the node users named in `nodes`, fresh passwords), all 0600.
    An existing password file is kept, so rewriting the config does not lock anyone out.
    Returns {"config": path, "<user>": password path, ...}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    users, paths = [], {}
    for name, role in [("mesh", "mesh")] + [(n, "node") for n in nodes]:
        path = directory / f"{name}.password"
        if path.exists():
            password = path.read_text().strip()
        else:
            password = new_password()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        users.append(User(name, password, role))
        paths[name] = path
    paths["config"] = write(directory / "nats.conf", settings, users)
    return paths
