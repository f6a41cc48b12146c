"""The mesh reporter: delivers the outbox to the mesh over gRPC with mutual TLS.

One task on the agent's loop. It queues a heartbeat every `heartbeat_s`, sends queued
reports in batches (incidents and mitigations before heartbeats) and removes those the
mesh acknowledges. A failed call is retried after an exponential backoff with jitter,
capped at `backoff_max_s`; reports stay in the outbox meanwhile, across restarts too.
New reports wake the sender at once unless it is backing off. Transitions (mesh reachable
/ unreachable) are logged once, not per retry.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from pathlib import Path
from typing import Any, Callable

import grpc

from agent.config import ConfigError, Mesh
from agent.proto.swarm.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from agent.state.outbox import Outbox, Pending

log = logging.getLogger("swarm_agent")

_DEADLINE = {None: mesh_pb2.DEADLINE_PENDING, 0: mesh_pb2.DEADLINE_MET,
             1: mesh_pb2.DEADLINE_MISSED}


# The mesh does not take this certificate: not a network failure, and no retry cures it.
REFUSED_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def backoff_s(failures: int, initial_s: float, max_s: float, rand: float) -> float:
    """Delay before the next try after `failures` consecutive failed calls: the cap
    initial_s * 2^(failures-1), at most max_s, with equal jitter (half fixed, half random
    from `rand` in [0, 1)) so agents that lost the mesh together do not retry together."""
    cap = min(max_s, initial_s * 2.0 ** min(max(failures - 1, 0), 32))
    return cap / 2 + cap / 2 * rand


def credentials(cfg: Mesh) -> grpc.ChannelCredentials:
    """Client credentials for mutual TLS; a missing or unreadable file is a ConfigError."""
    blobs = {}
    for key in ("tls_ca", "tls_key", "tls_cert"):
        try:
            blobs[key] = Path(getattr(cfg, key)).read_bytes()
        except (OSError, TypeError) as e:
            raise ConfigError(f"mesh.{key}: cannot read {getattr(cfg, key)}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
    return grpc.ssl_channel_credentials(root_certificates=blobs["tls_ca"],
                                        private_key=blobs["tls_key"],
                                        certificate_chain=blobs["tls_cert"])


def to_report(p: Pending, node_id: str) -> mesh_pb2.Report:
    """The wire form of one queued report."""
    r = mesh_pb2.Report(id=p.id, node_id=node_id, created_at=p.created_at, attempt=p.attempts)
    body = p.payload
    if p.kind == "incident":
        r.incident.CopyFrom(mesh_pb2.IncidentReport(
            incident_id=body["incident_id"], event_class=body["event_class"],
            entity=body["entity"], severity=body["severity"], state=body["state"],
            first_seen_at=body["first_seen_at"], detected_at=body["detected_at"],
            mitigated_at=body.get("mitigated_at") or 0.0,
            resolved_at=body.get("resolved_at") or 0.0, rules=body.get("rules") or [],
            findings=body.get("findings") or 0, summary=body.get("summary") or "",
            deadline=_DEADLINE.get(body.get("deadline_missed"), mesh_pb2.DEADLINE_PENDING),
            updated_at=p.created_at))
    elif p.kind == "mitigation":
        r.mitigation.CopyFrom(mesh_pb2.MitigationReport(
            mitigation_id=body["mitigation_id"], kind=body["kind"], target=body["target"],
            state=body["state"], incident_id=body.get("incident_id") or "",
            created_at=body["created_at"], expires_at=body.get("expires_at") or 0.0,
            updated_at=body.get("updated_at") or p.created_at,
            reason=body.get("reason") or "", rule=body.get("rule") or "",
            params_json=json.dumps(body.get("params") or {}, sort_keys=True)))
    elif p.kind == "evidence":
        bundle = body.get("bundle") or {}
        r.evidence.CopyFrom(mesh_pb2.EvidenceReport(
            incident_id=body["incident_id"], evidence_id=body["evidence_id"],
            collected_at=float(bundle.get("collected_at") or p.created_at),
            summary=str(bundle.get("summary") or ""),
            bundle_json=json.dumps(bundle, sort_keys=True)))
    elif p.kind == "feedback":
        r.feedback.CopyFrom(mesh_pb2.FeedbackReport(
            **{k: v for k, v in body.items() if v is not None and k != "feedback_id"},
            feedback_id=body["feedback_id"]))
    elif p.kind == "proposal":
        r.proposal.CopyFrom(mesh_pb2.Proposal(**{k: v for k, v in body.items() if v is not None}))
    else:
        r.heartbeat.CopyFrom(mesh_pb2.Heartbeat(**body))
    return r


class MeshReporter:
    """Delivers `outbox` to the mesh at `cfg.endpoint`. `heartbeat()` returns the fields
    of a Heartbeat message (seq and the outbox figures are filled in here);
    `on_delivered({kind: n})` and `on_failure()` (one failed call) feed the metrics."""

    def __init__(self, cfg: Mesh, outbox: Outbox, heartbeat: Callable[[], dict[str, Any]],
                 *, on_delivered: Callable[[dict[str, int]], None] = lambda counts: None,
                 on_failure: Callable[[], None] = lambda: None):
        assert cfg.endpoint is not None
        self.cfg, self.outbox = cfg, outbox
        self.node_id = cfg.node_id or socket.gethostname()
        self._heartbeat, self._on_delivered, self._on_failure = heartbeat, on_delivered, on_failure
        self._creds = credentials(cfg)          # read now: a bad file fails the start
        self._wake = asyncio.Event()
        self._seq = 0
        self.failures = 0                       # consecutive failed calls
        self.reachable: bool | None = None
        # Why the mesh refuses this node's certificate (revoked: `swarm-mesh node-revoke`;
        # not of its CA; no node name), "" otherwise: a cause no retry cures, so it is said
        # as an error and in status until a call succeeds (a new certificate, a restart).
        self.refused = ""

    def wake(self) -> None:
        """Something new is queued (called from the responder's observer hook)."""
        self._wake.set()

    def _channel(self) -> grpc.aio.Channel:
        ms = int(self.cfg.backoff_max_s * 1000)
        options = [
            # gRPC's own reconnect backoff must not outlast ours, or a mesh that is back
            # would stay unused for up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", min(1000, ms)),
            ("grpc.min_reconnect_backoff_ms", min(1000, ms)),
            ("grpc.max_reconnect_backoff_ms", ms),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if self.cfg.server_name:
            options.append(("grpc.ssl_target_name_override", self.cfg.server_name))
        return grpc.aio.secure_channel(self.cfg.endpoint, self._creds, options=options)

    def queue_heartbeat(self) -> None:
        self._seq += 1
        depth = sum(self.outbox.depth().values()) + 1
        body = {**self._heartbeat(), "seq": self._seq, "outbox_depth": depth,
                "outbox_dropped": sum(self.outbox.dropped.values())}
        self.outbox.add_heartbeat(body, time.time())

    async def run(self) -> None:
        channel = self._channel()
        stub = mesh_pb2_grpc.MeshReportingStub(channel)
        next_heartbeat = time.monotonic()
        try:
            while True:
                if time.monotonic() >= next_heartbeat:
                    self.queue_heartbeat()
                    next_heartbeat = time.monotonic() + self.cfg.heartbeat_s
                self.outbox.trim()
                batch = self.outbox.pending(self.cfg.batch_size)
                if batch and await self.send(stub, batch):
                    continue
                if batch:      # failed: back off, new reports do not shorten the wait
                    await asyncio.sleep(backoff_s(self.failures, self.cfg.backoff_initial_s,
                                                  self.cfg.backoff_max_s, random.random()))
                    continue
                self._wake.clear()
                wait_s = max(0.0, next_heartbeat - time.monotonic())
                try:
                    await asyncio.wait_for(self._wake.wait(), wait_s)
                except TimeoutError:
                    pass
        finally:
            await channel.close(grace=None)

    async def send(self, stub: mesh_pb2_grpc.MeshReportingStub, batch: list[Pending]) -> bool:
        """One call; True when the mesh acknowledged every report of `batch`."""
        request = mesh_pb2.ReportBatch(reports=[to_report(p, self.node_id) for p in batch])
        try:
            ack = await stub.Report(request, timeout=self.cfg.timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() in REFUSED_CODES:
                self._refused(e.details() or e.code().name)
            self._failed(batch, f"{e.code().name}: {e.details()}")
            return False
        sent = {p.id: p.kind for p in batch}
        accepted = [i for i in ack.accepted if i in sent]
        self.outbox.acknowledge(accepted)
        counts: dict[str, int] = {}
        for i in accepted:
            counts[sent[i]] = counts.get(sent[i], 0) + 1
        self._on_delivered(counts)
        done = set(accepted)
        missing = [p for p in batch if p.id not in done]
        if missing:
            self._failed(missing, f"the mesh did not acknowledge {len(missing)} reports")
            return False
        if self.reachable is not True:
            log.info("mesh reachable", extra={"endpoint": self.cfg.endpoint,
                                              "after_failures": self.failures})
        self.reachable, self.failures, self.refused = True, 0, ""
        return True

    def _refused(self, why: str) -> None:
        if why != self.refused:
            log.error("the mesh refuses this node's certificate; reports stay queued until "
                      "the node is enrolled again (swarm-mesh enroll) or the mesh accepts it",
                      extra={"endpoint": self.cfg.endpoint, "reason": why[:300]})
        self.refused = why[:300]

    def _failed(self, batch: list[Pending], why: str) -> None:
        self.outbox.failed(p.id for p in batch)
        self.failures += 1
        self._on_failure()
        if self.reachable is not False:
            log.warning("mesh unreachable; reports stay queued and are retried",
                        extra={"endpoint": self.cfg.endpoint, "error": why,
                               "queued": sum(self.outbox.depth().values())})
        self.reachable = False
