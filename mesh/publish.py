"""Publishing decisions on NATS JetStream: the stream SWARM_DECISIONS and the publisher.

The stream keeps one message per subject (one subject per target: the latest decision per
target wins), on disk, for the policy's lifetime cap plus a margin, and drops the oldest
when full. Each message carries `Nats-Msg-Id: <decision id>`: within the duplicate window
a republish of the same decision (after a restart that lost the ack) is acknowledged with
the original sequence instead of stored twice.

Errors are one sentence (PublishError). While nats-server is unreachable `publish` fails
at once rather than queueing: the decision stays pending in the store and the decider
retries with backoff. Once connected, the client reconnects on its own indefinitely.
A refusal that no retry can change (a subject or payload the client or JetStream will never
take) is a PublishError with `permanent` set: the decider marks that decision failed and
goes on. `stream_resets` counts the times the publisher had to create the stream (it was
missing): the decider then publishes every current decision again.

While connected, the publisher also keeps the stream's consumers to what nodes need
(nats-server 2.9 cannot: no per-user consumer limit, no cap on a consumer's
inactive_threshold): every REAP_EVERY_S it lists SWARM_DECISIONS' consumers as the mesh
user and deletes every one that is durable, pull (nodes cannot fetch), delivers outside
`_INBOX.`, or would outlive its subscriber by more than NODE_CONSUMER_MAX_IDLE_S
(inactive_threshold unset or larger). What is left, nats-server removes by itself within
NODE_CONSUMER_MAX_IDLE_S of its node going away.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent._vendor import nats
from agent._vendor.nats import errors as nats_errors
from agent._vendor.nats.js import errors as js_errors
from agent._vendor.nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from agent.fleet.decision import STREAM, SUBJECT_PREFIX
from mesh.natsconf import MESH_INBOX

log = logging.getLogger("swarm.mesh.publish")

STREAM_MARGIN_S = 3600.0        # the stream keeps a decision this long past the lifetime cap
DUPLICATE_WINDOW_S = 600.0
REAP_EVERY_S = 2.0
NODE_CONSUMER_MAX_IDLE_S = 60.0  # a node's consumer: inactive_threshold at most this
_LIST_PAGES_MAX = 400            # 256 consumers a page (nats-server's list limit)


class PublishError(RuntimeError):
    """Publishing failed; the message is one sentence for the operator. `permanent`: no
    retry will change it (the server is there and refuses this message)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def unwanted_consumer(info: Any) -> str | None:
    """Why a consumer of SWARM_DECISIONS is no node's (see the module docstring), or None.
    The agents' ordered consumers are ephemeral push consumers on `_INBOX.`; nats-server
    gives them an inactive_threshold of 5 s."""
    cfg = info.config
    if cfg is None:
        return None
    if cfg.durable_name:
        return "durable"
    if not cfg.deliver_subject:
        return "a pull consumer"
    if not str(cfg.deliver_subject).startswith("_INBOX."):
        return f"delivers to {cfg.deliver_subject}"
    idle = cfg.inactive_threshold
    if not idle or idle > NODE_CONSUMER_MAX_IDLE_S:
        return f"inactive_threshold {idle or 'unset'} over {NODE_CONSUMER_MAX_IDLE_S:g} s"
    return None


@dataclass(frozen=True)
class NatsOptions:
    """How the mesh reaches nats-server (the `nats:` section of the mesh configuration).
    The password is read from `password_file` (0600) rather than kept in the config."""
    url: str = "nats://127.0.0.1:4222"
    user: str = ""
    password: str = ""
    password_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    connect_timeout_s: float = 3.0
    ack_timeout_s: float = 3.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "NatsOptions":
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown nats setting {unknown[0]!r}")
        opts = cls(**d)
        for name in ("url", "user", "password", "password_file", "tls_ca", "tls_cert", "tls_key"):
            if not isinstance(getattr(opts, name), str):
                raise ValueError(f"nats {name} must be a string")
        if not opts.url.startswith(("nats://", "tls://")):
            raise ValueError(f"nats url {opts.url!r} must start with nats:// or tls://")
        if bool(opts.tls_cert) != bool(opts.tls_key):
            raise ValueError("nats tls_cert and tls_key go together")
        return opts

    def secret(self) -> str:
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as e:
                raise PublishError(f"cannot read the NATS password file {self.password_file}: "
                                   f"{e.strerror}") from None
        return self.password

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert or self.url.startswith("tls://")):
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise PublishError(f"cannot load the NATS TLS files: {e}") from None
        return ctx


def stream_config(max_ttl_s: float, duplicate_window_s: float = DUPLICATE_WINDOW_S) -> StreamConfig:
    return StreamConfig(name=STREAM, subjects=[f"{SUBJECT_PREFIX}.>"],
                        retention=RetentionPolicy.LIMITS, max_msgs_per_subject=1,
                        storage=StorageType.FILE, discard=DiscardPolicy.OLD,
                        max_age=max_ttl_s + STREAM_MARGIN_S, duplicate_window=duplicate_window_s,
                        num_replicas=1)


class Publisher:
    """One connection to nats-server as the mesh user. `publish` connects on first use and
    (re)creates the stream when it is missing; call `close` at the end."""

    def __init__(self, options: NatsOptions, max_ttl_s: float,
                 duplicate_window_s: float = DUPLICATE_WINDOW_S):
        self.options = options
        self.config = stream_config(max_ttl_s, duplicate_window_s)
        self._nc: Any = None
        self._js: Any = None
        self._stream_ok = False
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task | None = None
        self.last_error = ""
        self.stream_resets = 0          # times the stream was missing and created
        self.consumers_reaped = 0

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self) -> None:
        """Connects (bounded by connect_timeout_s) and ensures the stream."""
        async with self._lock:
            await self._connect()
            await self._ensure_stream()

    async def _connect(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            return
        o = self.options
        nc = nats.NATS()

        async def on_error(e: Exception) -> None:
            self.last_error = str(e) or type(e).__name__
            log.warning("nats: %s", self.last_error)

        async def on_disconnect() -> None:
            log.warning("nats: disconnected from %s", o.url)

        async def on_reconnect() -> None:
            self._stream_ok = False         # a restarted server may have lost the stream
            log.info("nats: reconnected to %s", o.url)

        kwargs: dict[str, Any] = dict(
            servers=[o.url], name="swarm-mesh", inbox_prefix=MESH_INBOX,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=1,
            connect_timeout=max(1, int(o.connect_timeout_s)), error_cb=on_error,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect)
        if o.user:
            kwargs.update(user=o.user, password=o.secret())
        tls = o.ssl_context()
        if tls is not None:
            kwargs["tls"] = tls
        try:
            # max_reconnect_attempts=-1 keeps trying forever, the first connect included:
            # the timeout bounds that one, later reconnects run in the background.
            await asyncio.wait_for(nc.connect(**kwargs), o.connect_timeout_s)
        except (asyncio.TimeoutError, OSError, nats_errors.Error) as e:
            await self._discard(nc)
            why = self.last_error or str(e) or "no answer"
            self.last_error = ""
            raise PublishError(f"cannot connect to nats-server at {o.url}: {why}") from None
        self._nc, self._js, self._stream_ok = nc, nc.jetstream(timeout=o.ack_timeout_s), False
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_loop())

    @staticmethod
    async def _discard(nc: Any) -> None:
        try:
            await asyncio.wait_for(nc.close(), 2.0)
        except (asyncio.TimeoutError, OSError, nats_errors.Error):
            pass

    async def _ensure_stream(self) -> None:
        if self._stream_ok:
            return
        try:
            try:
                info = await self._js.stream_info(STREAM)
            except js_errors.NotFoundError:
                await self._js.add_stream(self.config)
                self.stream_resets += 1
                log.warning("nats: created stream %s (it was missing)", STREAM)
            else:
                have = info.config
                want = self.config
                if (have.subjects, have.max_msgs_per_subject, have.max_age,
                        have.duplicate_window, have.discard) != (
                        want.subjects, want.max_msgs_per_subject, want.max_age,
                        want.duplicate_window, want.discard):
                    await self._js.update_stream(want)
                    log.info("nats: updated stream %s", STREAM)
        except (asyncio.TimeoutError, nats_errors.Error) as e:
            raise PublishError(f"cannot set up stream {STREAM}: {e or type(e).__name__}") from None
        self._stream_ok = True

    async def publish(self, subject: str, body: bytes, msg_id: str) -> int:
        """Publishes one decision envelope; returns its stream sequence (the original one
        when JetStream recognised `msg_id` as a duplicate)."""
        async with self._lock:
            await self._connect()
            if not self._nc.is_connected:
                raise PublishError(f"nats-server at {self.options.url} is not connected "
                                   f"(reconnecting)")
            for attempt in (1, 2):
                await self._ensure_stream()
                try:
                    ack = await self._js.publish(subject, body, stream=STREAM,
                                                 headers={"Nats-Msg-Id": msg_id})
                    return ack.seq
                except js_errors.NoStreamResponseError:
                    self._stream_ok = False         # the stream is gone: recreate it, once
                    if attempt == 2:
                        raise PublishError(f"stream {STREAM} does not answer") from None
                except (asyncio.TimeoutError, nats_errors.TimeoutError):
                    raise PublishError(f"nats-server did not acknowledge {subject} within "
                                       f"{self.options.ack_timeout_s:g} s") from None
                except js_errors.BadRequestError as e:
                    raise PublishError(f"JetStream refused {subject}: {e.description}",
                                       permanent=True) from None
                except js_errors.APIError as e:
                    raise PublishError(f"JetStream refused {subject}: {e.description}") from None
                except (nats_errors.BadSubjectError, nats_errors.MaxPayloadError) as e:
                    raise PublishError(f"publishing {subject} is refused: "
                                       f"{e or type(e).__name__}", permanent=True) from None
                except nats_errors.Error as e:
                    raise PublishError(f"publishing {subject} failed: {e}") from None
                except (ValueError, TypeError, KeyError):
                    raise PublishError(f"nats-server answered the publish of {subject} with "
                                       f"something that is not an acknowledgement") from None
            raise AssertionError("unreachable")

    async def reap_consumers(self) -> int:
        """Deletes the stream's consumers no node should have (unwanted_consumer); returns
        how many. Quiet when disconnected or the stream is missing."""
        js = self._js
        if js is None or not self.connected:
            return 0
        found: list[Any] = []
        try:
            for _ in range(_LIST_PAGES_MAX):
                page = await js.consumers_info(STREAM, offset=len(found))
                if not page:
                    break
                found += page
        except js_errors.NotFoundError:
            return 0
        except (asyncio.TimeoutError, nats_errors.Error) as e:
            log.warning("nats: cannot list the consumers of %s: %s", STREAM, e or type(e).__name__)
            return 0
        deleted = 0
        for info in found:
            why = unwanted_consumer(info)
            if why is None:
                continue
            try:
                await js.delete_consumer(STREAM, info.name)
            except js_errors.NotFoundError:
                continue                          # gone by itself meanwhile
            except (asyncio.TimeoutError, nats_errors.Error) as e:
                log.warning("nats: cannot delete consumer %s: %s", info.name, e or type(e).__name__)
                continue
            deleted += 1
            log.warning("nats: deleted consumer %s of %s: %s", info.name, STREAM, why)
        self.consumers_reaped += deleted
        return deleted

    async def _reap_loop(self) -> None:
        while self._nc is not None:
            await self.reap_consumers()
            await asyncio.sleep(REAP_EVERY_S)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            await self._discard(nc)
