"""Fleet decisions: what the mesh publishes and what every agent verifies before enforcing.

A decision is one JSON object, signed by the mesh with Ed25519 over its canonical encoding
(sorted keys, no spaces, ASCII). On the wire (a NATS JetStream message on
`subject_for(target)`) it travels in an envelope:

    {"d": {...the decision...}, "k": "<key id>", "s": "<base64 signature of canonical(d)>"}

The stream keeps one message per subject (the latest decision per target wins); a revoke
is a decision on the same subject. What an agent checks, in order, before it acts: the
envelope parses, the key id is one it trusts, the signature verifies, the message came
on the subject its target names (a signed decision replayed on another target's subject
must not supersede that target's latest), the fields are well formed (a network with no
host bits, an action it knows, a lifetime within its cap, not issued in the future), and
it has not expired. The
caller also keeps, per target, the newest `issued_at` it applied and ignores anything
older: a signed block replayed after its revocation changes nothing.

Nothing here does I/O but reading and writing key files; signing lives in the mesh,
verifying in the agent, both through this module so the two cannot drift.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION = 1
ACTIONS = ("block", "revoke")
STAGES = ("canary", "all")
STREAM = "SWARM_DECISIONS"
SUBJECT_PREFIX = "swarm.decisions"
MAX_BODY_BYTES = 16384            # a decision is small; anything bigger is refused unread
MAX_LIFETIME_S = 7 * 86400.0      # hard cap an agent applies whatever the mesh says
_TARGET_CHARS = re.compile(r"[0-9A-Fa-f.:/]+")


class DecisionError(ValueError):
    """A decision that must not be applied; the message says why, for the refusal record."""


def canonical(obj: Any) -> bytes:
    """The bytes that are signed: JSON with sorted keys, no spaces, ASCII only, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def normalize_target(target: str) -> str:
    """'203.0.113.7' -> '203.0.113.7/32'; a network with host bits set is refused (it is
    ambiguous which was meant), as is anything that is not an address or a network."""
    if not isinstance(target, str) or not target or len(target) > 64:
        raise DecisionError(f"target {target!r} is not an address or network")
    if _TARGET_CHARS.fullmatch(target.strip()) is None:
        # Python accepts an IPv6 zone ("fe80::1%eth0"): nftables does not, and a zone
        # with spaces is not even a NATS subject. Only the digits of an address pass.
        raise DecisionError(f"target {target!r} has characters no address or network has")
    try:
        net = ipaddress.ip_network(target.strip(), strict=True)
    except ValueError as e:
        raise DecisionError(f"target {target!r}: {e}") from None
    return str(net)


def subject_for(target: str) -> str:
    """The NATS subject of a target's decisions: one subject per network, so the stream's
    one-message-per-subject limit keeps exactly the latest decision per target.
    '203.0.113.0/24' -> 'swarm.decisions.v4.203-0-113-0.24'."""
    net = ipaddress.ip_network(target, strict=True)
    addr = str(net.network_address).replace(".", "-").replace(":", "_")
    return f"{SUBJECT_PREFIX}.v{net.version}.{addr}.{net.prefixlen}"


def key_id(public: Ed25519PublicKey) -> str:
    """A key's short name: the first 16 hex digits of the SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Decision:
    """One fleet decision. `expires_at` of a block is when enforcement ends; of a revoke,
    when the revocation may be forgotten (the revoked block's own expiry). `scope` is
    {"stage": "all"} or {"stage": "canary", "nodes": [...]} (staged rollout: only the named
    nodes act until the mesh republishes it for all). `provenance` records why: {"kind":
    "corroborated", "nodes": [...], "rules": [...], "proposals": [...]} or {"kind":
    "operator", "operator": "...", ...}."""

    action: str
    target: str
    issued_at: float
    expires_at: float
    reason: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    scope: dict[str, Any] = field(default_factory=lambda: {"stage": "all"})
    revokes: str = ""                 # a revoke: the id of the decision it lifts ("" any)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    v: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def subject(self) -> str:
        return subject_for(self.target)

    def applies_to(self, node_id: str) -> bool:
        """Whether the node named `node_id` acts on it (staged rollout)."""
        if self.scope.get("stage") == "all":
            return True
        return node_id in (self.scope.get("nodes") or ())

    def check(self, now: float, max_lifetime_s: float = MAX_LIFETIME_S) -> None:
        """Well-formedness an agent insists on whoever signed it; raises DecisionError."""
        if self.v != VERSION:
            raise DecisionError(f"decision version {self.v!r} is not {VERSION}")
        if self.action not in ACTIONS:
            raise DecisionError(f"action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if normalize_target(self.target) != self.target:
            raise DecisionError(f"target {self.target!r} is not in normal form")
        for name in ("issued_at", "expires_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise DecisionError(f"{name} {value!r} is not a time")
        if self.expires_at <= self.issued_at:
            raise DecisionError("expires before it was issued")
        if self.expires_at - self.issued_at > max_lifetime_s:
            raise DecisionError(f"lifetime {self.expires_at - self.issued_at:.0f} s is over "
                                f"the cap of {max_lifetime_s:.0f} s")
        if self.issued_at > now + 300:
            raise DecisionError("issued more than 5 minutes in the future (clock or forgery)")
        stage = self.scope.get("stage") if isinstance(self.scope, dict) else None
        if stage not in STAGES:
            raise DecisionError(f"scope stage {stage!r} is not one of {', '.join(STAGES)}")
        if stage == "canary" and not (isinstance(self.scope.get("nodes"), list)
                                      and all(isinstance(n, str) for n in self.scope["nodes"])):
            raise DecisionError("a canary scope names its nodes")
        if not isinstance(self.provenance, dict) or not isinstance(self.reason, str) \
                or not isinstance(self.revokes, str) or not isinstance(self.id, str) or not self.id:
            raise DecisionError("malformed provenance, reason, revokes or id")

    @classmethod
    def from_dict(cls, d: Any) -> "Decision":
        if not isinstance(d, dict):
            raise DecisionError("decision is not an object")
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise DecisionError(f"unknown decision fields: {', '.join(sorted(extra))}")
        missing = {"action", "target", "issued_at", "expires_at", "id", "v"} - set(d)
        if missing:
            raise DecisionError(f"missing decision fields: {', '.join(sorted(missing))}")
        return cls(**d)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8) file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise DecisionError(f"{path}: not an Ed25519 private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DecisionError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise DecisionError(f"{path}: not an Ed25519 public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DecisionError(f"{path}: not an Ed25519 public key")
    return key


def generate_key(private_path: str | Path, public_path: str | Path) -> str:
    """A new signing key: the private half written 0600 (never over an existing file), the
    public half beside it for agents. Returns the key id."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    Path(public_path).write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


def _subject_of(target: Any) -> str | None:
    """The subject of a target in normal form; None for anything else (check() says why)."""
    try:
        return subject_for(normalize_target(target))
    except (DecisionError, ValueError, TypeError):
        return None


class Signer:
    """The mesh's side: signs decisions into envelopes."""

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.key_id = key_id(key.public_key())

    def envelope(self, decision: Decision) -> bytes:
        d = decision.to_dict()
        sig = self._key.sign(canonical(d))
        return canonical({"d": d, "k": self.key_id, "s": base64.b64encode(sig).decode()})


class Verifier:
    """The agent's side: the mesh keys it trusts (several during a key rotation)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]):
        self.keys = {key_id(k): k for k in keys}
        if not self.keys:
            raise DecisionError("no trusted decision key")

    def open(self, body: bytes, subject: str, now: float,
             max_lifetime_s: float = MAX_LIFETIME_S) -> Decision:
        """The decision in an envelope received on `subject`, verified and checked; raises
        DecisionError with the reason otherwise. Expired decisions are refused too."""
        return self.open_signed(body, subject, now, max_lifetime_s)[0]

    def open_signed(self, body: bytes, subject: str, now: float,
                    max_lifetime_s: float = MAX_LIFETIME_S) -> tuple[Decision, str]:
        """open(), and the id of the key that signed it (the agent records it with the
        entry: a change of trusted keys lifts only what an untrusted key signed)."""
        if len(body) > MAX_BODY_BYTES:
            raise DecisionError(f"message of {len(body)} bytes is over {MAX_BODY_BYTES}")
        try:
            env = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise DecisionError("message is not JSON") from None
        except RecursionError:      # 16 kB of "[[[[": parsed before it can be verified
            raise DecisionError("message is not JSON (nested too deeply)") from None
        if not isinstance(env, dict) or set(env) != {"d", "k", "s"}:
            raise DecisionError("message is not a signed decision envelope")
        key = self.keys.get(env["k"]) if isinstance(env["k"], str) else None
        if key is None:
            raise DecisionError(f"signed by an untrusted key {str(env['k'])[:32]!r}")
        try:
            sig = base64.b64decode(env["s"], validate=True)
            key.verify(sig, canonical(env["d"]))
        except (InvalidSignature, binascii.Error, TypeError, ValueError, RecursionError):
            raise DecisionError("bad signature") from None
        try:
            decision = Decision.from_dict(env["d"])
        except TypeError as e:
            raise DecisionError(f"malformed decision: {e}") from None
        # The subject before the times: a genuine decision copied onto other subjects is
        # refused as such, never as "issued in the future" (which is fetched again later:
        # copies would fill the re-fetch list and push the real subject out).
        own = _subject_of(decision.target)
        if own is not None and subject != own:
            raise DecisionError(f"came on {subject}, but its target's subject is {own}")
        decision.check(now, max_lifetime_s)
        if decision.expires_at <= now:
            raise DecisionError("expired")
        return decision, env["k"]
