"""The mesh service's configuration: YAML in, a validated frozen object out.

Every problem is one MeshConfigError sentence naming the key; the CLI prints it and exits 2.
The `nats:`, `signing:` and `policy:` sections belong to the decision service
(mesh/decide.py and friends): here they are only checked to be mappings and kept as dicts,
except `nats.server`, the embedded nats-server (mesh/natsproc.py), which is validated here
and kept apart in `nats_server` (`nats` holds only how the service connects).
"""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.yamlsafe import YamlError, printable, read_yaml

SYSTEM_CONFIG = Path("/etc/swarm-mesh/config.yaml")
DEFAULT_STORE = "sqlite:///var/lib/swarm-mesh/mesh.db"
CONFIG_MAX_BYTES = 1 << 20
LOG_FORMATS = ("json", "plain")
LOG_LEVELS = ("debug", "info", "warning", "error")
SECTIONS = ("nats", "signing", "policy")    # opaque here: the decision service reads them


class MeshConfigError(ValueError):
    """Invalid configuration; the message is one sentence for the operator."""


@dataclass(frozen=True)
class NatsServerConfig:
    """`nats.server`: `swarm-mesh run` starts nats-server itself, as a child process."""
    config: str                       # nats-server's config file (swarm-mesh init writes one)
    binary: str = "nats-server"       # a name looked up on PATH and in /usr/sbin, or a path
    log_file: str | None = None       # its output appended here; None: into the service's log


@dataclass(frozen=True)
class MeshConfig:
    """The whole config. `tls_*` are required only to serve (`swarm-mesh run`); the query
    commands need only `store`."""

    listen: str = "127.0.0.1:7443"    # host:port of the mTLS reporting API (port 0: any)
    tls_cert: str | None = None       # the service's certificate (PEM)
    tls_key: str | None = None        # its private key (PEM)
    tls_ca: str | None = None         # CA that node client certificates must chain to
    store: str = DEFAULT_STORE        # sqlite:///path, a plain path, or postgresql://...
    node_stale_s: float = 90.0        # no report for this long: the node is "stale"
    report_ids_keep_s: float = 2 * 86400.0   # how long processed report ids are remembered
    proposals_keep_s: float = 7 * 86400.0    # proposals kept (>= the corroboration window)
    refusals_keep_s: float = 30 * 86400.0    # refusals kept (>= proposals_keep_s)
    max_message_bytes: int = 64 << 20        # largest ReportBatch accepted
    log_format: str = "json"
    log_level: str = "info"
    metrics_listen: str | None = "127.0.0.1:9465"   # Prometheus /metrics (mesh/metrics.py); null: off
    nats: dict[str, Any] = field(default_factory=dict)
    signing: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    nats_server: NatsServerConfig | None = None   # nats.server (None: an external nats-server)
    path: str | None = None           # the file it came from (None: built-in defaults)

    def require_tls(self) -> None:
        """Raise unless the three TLS files are set and readable (serving needs them)."""
        where = f"config {self.path}" if self.path else "the built-in config"
        missing = [k for k in ("tls_cert", "tls_key", "tls_ca") if not getattr(self, k)]
        if missing:
            raise MeshConfigError(f"{where} lacks {', '.join(missing)}: the mesh service "
                                  "serves only mutual TLS")
        for key in ("tls_cert", "tls_key", "tls_ca"):
            p = Path(getattr(self, key))
            try:
                p.read_bytes()
            except OSError as e:
                raise MeshConfigError(f"{key}: cannot read {printable(str(p))}: "
                                      f"{e.strerror}") from None

    def tls_files(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, private key, CA bundle) as bytes; require_tls() first."""
        return (Path(self.tls_cert).read_bytes(), Path(self.tls_key).read_bytes(),  # type: ignore[arg-type]
                Path(self.tls_ca).read_bytes())                                     # type: ignore[arg-type]


def load(path: str | Path | None) -> MeshConfig:
    """The config in `path`; None: SYSTEM_CONFIG if it exists, else the defaults."""
    if path is None:
        if not SYSTEM_CONFIG.exists():
            return MeshConfig()
        path = SYSTEM_CONFIG
    try:
        data = read_yaml(path, "config", CONFIG_MAX_BYTES)
    except YamlError as e:
        raise MeshConfigError(str(e)) from None
    return from_dict({} if data is None else data, str(path))


def from_dict(data: Any, path: str | None = None) -> MeshConfig:
    """Validate a parsed config mapping."""
    where = f"config {printable(path)}" if path else "config"
    if not isinstance(data, dict):
        raise MeshConfigError(f"{where} must be a mapping of keys to values")
    known = set(MeshConfig.__dataclass_fields__) - {"path", "nats_server"}
    for key in data:
        if key not in known:
            raise MeshConfigError(f"unknown config key {printable(str(key))!r} in {where}")
    kw: dict[str, Any] = {"path": path}
    for key in ("listen", "store", "log_format", "log_level"):
        if key in data:
            kw[key] = _string(key, data[key])
    for key in ("tls_cert", "tls_key", "tls_ca", "metrics_listen"):
        if data.get(key) is not None:
            kw[key] = _string(key, data[key])
    for key in ("node_stale_s", "report_ids_keep_s", "proposals_keep_s", "refusals_keep_s"):
        if key in data:
            kw[key] = _positive(key, data[key])
    if "max_message_bytes" in data:
        value = data["max_message_bytes"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 << 20 <= value <= 1 << 30:
            raise MeshConfigError(f"max_message_bytes must be an integer from 1 MiB to 1 GiB "
                                  f"(got {printable(repr(value))})")
        kw["max_message_bytes"] = value
    for key in SECTIONS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise MeshConfigError(f"{key} must be a mapping (got {type(value).__name__})")
        kw[key] = dict(value)
    if "server" in kw.get("nats", {}):
        kw["nats_server"] = _nats_server(kw["nats"].pop("server"))
    if "metrics_listen" in data and data["metrics_listen"] is None:
        kw["metrics_listen"] = None
    cfg = MeshConfig(**kw)
    _check_retention(cfg)
    split_listen(cfg.listen)
    if cfg.metrics_listen is not None:
        split_listen(cfg.metrics_listen, "metrics_listen")
    store_kind(cfg.store)
    if cfg.log_format not in LOG_FORMATS:
        raise MeshConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)} "
                              f"(got {printable(cfg.log_format)!r})")
    if cfg.log_level not in LOG_LEVELS:
        raise MeshConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)} "
                              f"(got {printable(cfg.log_level)!r})")
    return cfg


def _check_retention(cfg: MeshConfig) -> None:
    """Proposals are votes for the corroboration window and count against their node's
    rate for rate_window_s: kept at least that long. A refusal marks its proposal as no
    vote: kept at least as long as proposals are."""
    policy = cfg.policy or {}
    needed = max((float(policy.get(k, default)) for k, default in
                  (("corroboration_window_s", 1800.0), ("rate_window_s", 600.0))
                  if isinstance(policy.get(k, default), (int, float))), default=0.0)
    if cfg.proposals_keep_s < needed:
        raise MeshConfigError(f"proposals_keep_s ({cfg.proposals_keep_s:g}) must be at least the "
                              f"policy's corroboration and rate windows ({needed:g} s)")
    if cfg.refusals_keep_s < cfg.proposals_keep_s:
        raise MeshConfigError(f"refusals_keep_s ({cfg.refusals_keep_s:g}) must be at least "
                              f"proposals_keep_s ({cfg.proposals_keep_s:g}): a refused proposal "
                              "would count as a vote again")


def _nats_server(value: Any) -> NatsServerConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MeshConfigError(f"nats.server must be a mapping (got {type(value).__name__})")
    unknown = sorted(set(value) - set(NatsServerConfig.__dataclass_fields__))
    if unknown:
        raise MeshConfigError(f"unknown config key nats.server.{printable(str(unknown[0]))}")
    if "config" not in value:
        raise MeshConfigError("nats.server needs config: the nats-server config file to run")
    kw = {k: _string(f"nats.server.{k}", value[k]) for k in ("config", "binary") if k in value}
    if value.get("log_file") is not None:
        kw["log_file"] = _string("nats.server.log_file", value["log_file"])
    return NatsServerConfig(**kw)


def split_listen(listen: str, key: str = "listen") -> tuple[str, int]:
    """("host", port) of a "host:port" or "[v6]:port" listen address (config `key`)."""
    host, sep, port = listen.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    bad = MeshConfigError(f"{key} must be host:port, [IPv6]:port for IPv6 "
                          f"(got {printable(listen)!r})")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise bad
    if ":" in host or bracketed:
        if not bracketed:
            raise bad
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    return host, int(port)


def shown_url(url: str) -> str:
    """A store URL for messages and logs, its secrets masked: the password of
    user:password@ and of libpq's ?password= / ?sslpassword= parameters."""
    url = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)
    return printable(re.sub(r"([?&](?:ssl)?password=)[^&#]*", r"\1***", url,
                            flags=re.IGNORECASE))


def store_kind(url: str) -> str:
    """"sqlite" or "postgresql" for a store URL or path; raises for anything else."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return "sqlite"
    if "://" in url or not url:
        raise MeshConfigError(f"store must be sqlite:///PATH, a file path or postgresql://... "
                              f"(got {shown_url(url)!r})")
    return "sqlite"


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise MeshConfigError(f"{key} must be a non-empty string (got {printable(repr(value))})")
    return value


def _positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise MeshConfigError(f"{key} must be a positive number of seconds "
                              f"(got {printable(repr(value))})")
    return float(value)
