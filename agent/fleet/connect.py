"""How the agent reaches the fleet's NATS servers, in one place: the connection options
(credentials, TLS, timeouts) and the consumer it reads SWARM_DECISIONS through. The mesh
side (mesh/natsconf.py) grants a node user exactly what these need; a change of the node
recipe there (an inbox prefix, another consumer form) is a change here."""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from agent._vendor import nats
from agent._vendor.nats.errors import NoServersError
from agent._vendor.nats.js.api import ConsumerConfig, DeliverPolicy
from agent.fleet.config import FleetConfig
from agent.fleet.decision import STREAM, SUBJECT_PREFIX

IDLE_HEARTBEAT_S = 2.0      # the server's heartbeat on the consumer (a stalled one is seen)


def options(fc: FleetConfig, node_id: str) -> dict[str, Any]:
    """nats.connect keyword arguments. No client reconnect: the subscriber reconnects,
    jittered, and resumes from its cursor."""
    opts: dict[str, Any] = {"servers": fc.servers, "allow_reconnect": False,
                            "connect_timeout": 2, "ping_interval": 5,
                            "max_outstanding_pings": 2, "name": f"swarm-agent {node_id}"}
    if fc.user:
        opts["user"] = fc.user
        password = fc.password
        if fc.password_file:
            password = Path(fc.password_file).read_text().splitlines()[0].strip()
        opts["password"] = password or ""
    if fc.tls_ca or fc.tls_cert or any(u.startswith("tls://") for u in fc.servers):
        ctx = ssl.create_default_context(cafile=fc.tls_ca)
        if fc.tls_cert:
            ctx.load_cert_chain(fc.tls_cert, fc.tls_key)
        opts["tls"] = ctx
    return opts


async def connect(fc: FleetConfig, node_id: str) -> Any:
    """A connection, or ConnectionError saying why none could be made."""
    last: list[Exception] = []

    async def remember(e: Exception) -> None:   # failures surface through the session
        last[:] = [e]

    async def quiet(*_: Any) -> None:
        return None
    try:
        # A bounded try per server (nats-py tries each twice before giving up on it):
        # left to itself, connect() retries an unreachable server every 2 s for about
        # two minutes, allow_reconnect or not, which replaces run()'s jittered backoff
        # with a fixed period that keeps a whole fleet retrying in step.
        return await nats.connect(**options(fc, node_id), max_reconnect_attempts=1,
                                  reconnect_time_wait=0, error_cb=remember,
                                  disconnected_cb=quiet, closed_cb=quiet)
    except NoServersError:
        raise ConnectionError("no NATS server reachable" + (f": {last[0]}" if last else "")) \
            from None


async def subscribe(js: Any, start_seq: int | None) -> Any:
    """An ordered consumer of every decision: the whole stream (start_seq None: the
    snapshot) or from `start_seq` on."""
    if start_seq is None:
        return await js.subscribe(f"{SUBJECT_PREFIX}.>", stream=STREAM, ordered_consumer=True,
                                  deliver_policy=DeliverPolicy.ALL, idle_heartbeat=IDLE_HEARTBEAT_S)
    return await js.subscribe(f"{SUBJECT_PREFIX}.>", stream=STREAM, ordered_consumer=True,
                              deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                              config=ConsumerConfig(opt_start_seq=start_seq),
                              idle_heartbeat=IDLE_HEARTBEAT_S)


async def subscribe_latest(js: Any) -> Any:
    """An ordered consumer of every subject's latest decision (the agent's anti-entropy
    read). Ephemeral, like the others: the node user may create no other kind."""
    return await js.subscribe(f"{SUBJECT_PREFIX}.>", stream=STREAM, ordered_consumer=True,
                              deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                              idle_heartbeat=IDLE_HEARTBEAT_S)
