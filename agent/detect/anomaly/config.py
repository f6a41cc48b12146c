"""The `anomaly:` config section: what the anomaly engine runs, its windows, warm-up,
false-alarm budget, beacon scorer and persistence. Numeric ranges are declared in
agent/configcheck.py BOUNDS (keys "anomaly.*"); `check()` adds what one key cannot say."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

DETECTORS = ("mahalanobis", "hst", "loda", "zscore", "newexe", "beacon", "drift")
MODELS = ("mahalanobis", "hst", "loda", "zscore")   # scored windows, calibrated
DEFAULT_DETECTORS = ("mahalanobis", "beacon", "drift")
ROTATING_SERVICES = ("systemd-timesyncd.service:123", "chrony.service:123",
                     "chronyd.service:123", "ntp.service:123", "ntpsec.service:123",
                     "openntpd.service:123", "systemd-resolved.service:53")


@dataclass(frozen=True)
class Hst:
    """Half-Space Trees (Tan, Ting, Liu 2011): `trees` trees of `depth`."""
    trees: int = 16
    depth: int = 10


@dataclass(frozen=True)
class Beacon:
    """anomaly.beacon: periodic outbound TCP connections per (workload, destination, port),
    scored RITA-style (Bowley skew and MAD of intervals and sizes)."""
    min_conns: int = 6              # connections before a pair is scored
    history: int = 32               # connection times kept per pair (at least min_conns)
    threshold: float = 0.8          # periodicity score (0..1) to report
    # Slower than this is not looked at: an hourly cron job's ping is as periodic as any
    # implant, and a slower beacon takes hours to show here anyway (left to the workload
    # models, known lists and feedback).
    max_interval_s: float = 900.0
    max_median_bytes: int = 1 << 20  # bulk transfers (checkpoints) are not beacons
    prevalence_max: int = 3         # a destination this many workloads use is shared
    max_pairs: int = 4096           # (workload, destination, port) pairs tracked
    # Internal destinations (RFC 1918, CGNAT, ULA, link-local): a command-and-control
    # server sits outside; inside are kubelet's probes, scrapes, service meshes, all
    # periodic. true scores them too.
    internal: bool = False


@dataclass(frozen=True)
class Drift:
    """anomaly.drift: the slow mean of a profile's features against the reference frozen at
    the end of its warm-up (a boiling frog the adaptive models would learn)."""
    z: float = 10.0          # robust z of the slow mean against the frozen reference
    min_s: float = 3600.0    # sustained this long
    halflife_s: float = 3600.0


@dataclass(frozen=True)
class AnomalyConfig:
    enabled: bool = True
    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    window_s: float = 10.0
    warmup_s: float = 3600.0
    warmup_windows: int = 500           # scored windows before a detector alerts
    false_alarm_rate: float = 1e-5      # per window: the calibrated threshold
    persistence_k: int = 2              # k of the last m windows over the per-window level
    persistence_m: int = 3              # (taken as at least k)
    dedup_s: float = 3600.0             # one finding per (workload, detector) this often
    # A window model's finding needs something never seen in the window (an executable, a
    # destination block, a port, a listener, a GPU process, unauthorized GPU memory):
    # volume alone (a checkpoint upload, a burst of clients) is counted in status
    # (volume_only) and left to anomaly.drift. false: volume alone opens findings too.
    require_novelty: bool = True
    max_workloads: int = 256
    novelty_max: int = 4096             # entries per never-seen set
    recent_events: int = 64             # per workload, for evidence
    known_destinations: tuple[str, ...] = ()   # CIDRs never scored as beacons
    ignore_cgroups: tuple[str, ...] = ()       # cgroup paths (and below) not modelled
    # Host services whose destinations rotate by design ("unit:port"): a new destination
    # they reach on that port is no news and not beacon-scored (NTP pool servers, DNS
    # resolvers); their connections and bytes still count. /system.slice/UNIT only: a
    # container or a user's unit is never one.
    rotating_services: tuple[str, ...] = ROTATING_SERVICES
    # A new container (in a never-seen pod) of a known kind: the programs it runs from image
    # directories in its first image_grace_s are its image's (a new job version), no news
    # to it; its destinations and listeners are. 0: every never-seen program is news.
    image_grace_s: float = 120.0
    state_path: str | None = None       # default <state_dir>/anomaly-state.json
    save_every_s: float = 300.0
    seed: int = 1
    model_window: int = 1000      # windows of a profile in a HST/LODA reference (memory)
    loda_projections: int = 32
    hst: Hst = field(default_factory=Hst)
    beacon: Beacon = field(default_factory=Beacon)
    drift: Drift = field(default_factory=Drift)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "AnomalyConfig":
        """Validated config from a mapping (the `anomaly:` section, a bundle's model
        config); raises ValueError (agent.config.ConfigError) with one sentence."""
        from agent.config import _build   # lazy: agent.config imports this module

        return _build(cls, {} if d is None else d, "anomaly.").check()

    def check(self) -> "AnomalyConfig":
        for name in self.detectors:
            if name not in DETECTORS:
                raise _error(f"anomaly.detectors: unknown detector {name!r} "
                             f"(one of {', '.join(DETECTORS)})")
        for net in self.known_destinations:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise _error(f"anomaly.known_destinations: {net!r} is not an IP address "
                             "or CIDR") from None
        for path in self.ignore_cgroups:
            if not path.startswith("/"):
                raise _error(f"anomaly.ignore_cgroups: {path!r} is not a cgroup path "
                             "(it starts with /)")
        for item in self.rotating_services:
            unit, _, port = str(item).rpartition(":")
            if not unit.endswith(".service") or "/" in unit or not port.isdigit() or \
                    not 0 < int(port) < 65536:
                raise _error(f"anomaly.rotating_services: {item!r} is not UNIT.service:PORT")
        if self.state_path is not None and not self.state_path.startswith("/"):
            raise _error("anomaly.state_path must be an absolute path")
        return self


def rotating_ports(cfg: AnomalyConfig, cgroup: str, container: str) -> frozenset[int]:
    """The ports on which a workload's destinations rotate by design: a host unit's
    (its cgroup's last component) listed in rotating_services; none for a container."""
    if container or not cgroup:
        return frozenset()
    # a system unit only: /system.slice/UNIT (a user's `systemd-run --user --unit=NAME`
    # lands under user.slice and is no system service)
    return frozenset(int(port) for u, _, port in
                     (str(i).rpartition(":") for i in cfg.rotating_services)
                     if cgroup.rstrip("/") == f"/system.slice/{u}")


def _error(message: str) -> ValueError:
    try:
        from agent.config import ConfigError
    except ImportError:    # pragma: no cover
        return ValueError(message)
    return ConfigError(message)


BOUNDS_HELP = {   # the anomaly keys' ranges (agent/configcheck.py BOUNDS), as (low, high)
    "anomaly.window_s": (1, 3600),
    "anomaly.warmup_s": (0, 30 * 86400),
    "anomaly.warmup_windows": (10, 10_000_000),
    "anomaly.false_alarm_rate": (1e-9, 0.1),
    "anomaly.persistence_k": (1, 32),
    "anomaly.persistence_m": (1, 32),
    "anomaly.dedup_s": (0, 30 * 86400),
    "anomaly.max_workloads": (1, 100_000),
    "anomaly.novelty_max": (16, 1_000_000),
    "anomaly.recent_events": (0, 10_000),
    "anomaly.save_every_s": (1, 86400),
    "anomaly.image_grace_s": (0, 3600),
    "anomaly.seed": (0, 2**31 - 1),
    "anomaly.hst.trees": (1, 256),
    "anomaly.hst.depth": (2, 16),
    "anomaly.model_window": (16, 1_000_000),
    "anomaly.loda_projections": (1, 1024),
    "anomaly.beacon.min_conns": (4, 1000),
    "anomaly.beacon.history": (4, 1000),
    "anomaly.beacon.threshold": (0.0, 1.0),
    "anomaly.beacon.max_interval_s": (1, 86400),
    "anomaly.beacon.max_median_bytes": (1, 1 << 40),
    "anomaly.beacon.prevalence_max": (1, 100_000),
    "anomaly.beacon.max_pairs": (16, 1_000_000),
    "anomaly.drift.z": (1, 1000),
    "anomaly.drift.min_s": (0, 30 * 86400),
    "anomaly.drift.halflife_s": (60, 30 * 86400),
}
