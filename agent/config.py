"""Agent configuration: YAML in, a validated frozen tree out.

Every problem is reported as one ConfigError sentence naming the key; the CLI turns it
into exit code 2 before anything is applied to the host.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from agent import configcheck, gpugrant
# The `breach:` section's defaults (executables by path, never by comm), re-exported.
from agent.breach_defaults import (ADMIN_TOOLS, CREDENTIAL_PATHS, DEBUGGERS, LOADERS,  # noqa: F401
                                   EXE_LISTS,
                                   PACKAGE_MANAGERS, REFRESH_S, REMOTE_ACCESS, REPLACED,
                                   SERVICE_MANAGERS, SERVICES, SHELLS)
from agent.gpugrant import SYSTEM_CGROUPS, SYSTEM_EXES, Grant
from agent.detect.anomaly.config import AnomalyConfig
from agent.fleet.config import FleetConfig
from agent.model import EventClass, Severity
from agent import policyconfig
from agent.policyconfig import EgressRule, Policy  # noqa: F401  (the policy: section)
from agent.yamlsafe import YamlError, read_yaml

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_RULES = PACKAGE_DIR / "rules"   # a directory: every *.yaml in it
SYSTEM_CONFIG = Path("/etc/swarm-agent/config.yaml")
CONFIG_MAX_BYTES = 1 << 20
ATTACH_MODES = ("auto", "native", "tc", "generic")   # probes.attach_mode


class ConfigError(ValueError):
    """Invalid configuration; the message is meant for the operator as is."""


@dataclass(frozen=True)
class Allowlist:
    management: tuple[str, ...] = ()     # operators' networks: never blocked
    mesh: tuple[str, ...] = ()           # mesh control plane: never blocked
    load_balancers: tuple[str, ...] = ()  # exempt from connection-rate rules, never blocked

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False)
                for n in (*self.management, *self.mesh, *self.load_balancers)]


@dataclass(frozen=True)
class RateLimit:
    packets_per_second: int = 20
    burst: int = 40


@dataclass(frozen=True)
class Reroute:
    sinkhole_v4: str | None = None   # DNAT target for rerouted IPv4 sources
    sinkhole_v6: str | None = None
    mark: int | None = None          # packet mark for policy routing (ip rule fwmark)


@dataclass(frozen=True)
class Enforce:
    set_size: int = 65536
    rate_limit: RateLimit = RateLimit()
    service_rate_limit: RateLimit = RateLimit(packets_per_second=100, burst=200)
    # Per source, for the unsolicited non-TCP packets of a challenged source and for the
    # datagrams each source sends to a challenged UDP service (established exchanges pass).
    challenge_rate_limit: RateLimit = RateLimit(packets_per_second=200, burst=400)
    reroute: Reroute = Reroute()


@dataclass(frozen=True)
class MitigationPolicy:
    default_ttl_s: float = 600.0
    max_ttl_s: float = 86400.0
    repeat_factor: float = 2.0        # each earlier mitigation of the same target multiplies the ttl
    repeat_window_s: float = 86400.0  # how far back earlier mitigations count
    max_sources_per_rule: int = 64    # per minute; beyond it the response targets the service
    # Automatic isolations (node, service) and WireGuard peer quarantines: None keeps them
    # until a human releases them (they are escalated); a number makes them expire.
    isolation_ttl_s: float | None = None


@dataclass(frozen=True)
class Probes:
    map_entries: int = 65536          # LRU size of per-source maps
    window_ms: int = 1000             # kernel counting window
    # Drop at XDP what the packet parser cannot follow and the kernel would still deliver
    # (an IPv6 extension-header chain longer than it follows, a first fragment cut inside
    # the TCP/UDP header, a malformed header): otherwise a flood so wrapped is invisible
    # to every flood rule. Counted by reason either way.
    drop_unparsable: bool = True
    # Where the host's agents register the network namespace whose processes each owns
    # (README, "Running it"); shared by every agent on the host, writable by root only.
    process_owners: str = "/run/swarm-agent/process-owners"
    # Watch 32-bit syscalls (x86-64 ia32 emulation, `int $0x80`), which skip every syscall
    # tracepoint: one handler on raw_syscalls:sys_exit, ~0.08 us added to every syscall of
    # the host (bench/RESULTS.md). Off: they pass unseen, and status says so.
    compat_syscalls: bool = True
    # Where the ingress program runs on each watched link (agent/sources/ingress.py):
    # "auto" picks per driver the hook that costs least (native XDP where the driver has
    # it, tc ingress on veth and where it has not, generic XDP as the last resort);
    # "native", "tc" or "generic" tries that hook first and falls back, reported, where
    # a link cannot take it.
    attach_mode: str = "auto"
    # Events waiting between the probes and the detector (agent.sources.queue; an urgent
    # lane of 1/16 as many beside it); past it events are dropped and counted by kind and
    # lane (status, swarm_agent_events_dropped).
    queue_events: int = 16384
    # The activity probe (agent/sources/activity.py): outbound TCP connections and their
    # outcome, listeners, bytes sent per destination, execs per cgroup and the first exec
    # of each file in each cgroup, for the anomaly models. Off: none of those events.
    activity: bool = True


@dataclass(frozen=True)
class Control:
    """The control API: always on the unix socket <run_dir>/control.sock (root only);
    also on TCP with mutual TLS when `listen` is set. A client certificate's identity is
    its subject CN only (agent/control/auth.py); CNs listed as viewers may read,
    operators may also act."""

    listen: str | None = None         # "host:port" for the mTLS listener; null: socket only
    tls_cert: str | None = None       # server certificate (PEM)
    tls_key: str | None = None        # its private key (PEM)
    tls_ca: str | None = None         # CA that signs client certificates (PEM)
    viewers: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mesh:
    """Mesh reporting (agent/report/mesh.py): incidents, mitigation changes and heartbeats
    over gRPC with mutual TLS, through the on-disk outbox. No endpoint: standalone."""

    endpoint: str | None = None       # "host:port" of the mesh reporting service
    server_name: str | None = None    # name in the mesh's certificate; default: endpoint host
    tls_cert: str | None = None       # this node's client certificate (PEM)
    tls_key: str | None = None        # its private key (PEM)
    tls_ca: str | None = None         # CA that signs the mesh's server certificate (PEM)
    node_id: str | None = None        # how the node names itself; default: the host name
    heartbeat_s: float = 30.0
    batch_size: int = 200             # reports per call
    timeout_s: float = 10.0           # per call
    backoff_initial_s: float = 0.5    # first retry delay after a failed call, doubled per failure
    backoff_max_s: float = 60.0       # cap on the retry delay (full jitter below it)
    outbox_max: int = 10000           # above it: oldest heartbeats, then mitigation reports dropped
    outbox_hard_max: int = 50000      # above it: oldest reports of any kind dropped

    def host(self) -> str:
        """The endpoint's host, a name or an address without brackets ("" without one)."""
        return (self.endpoint or "").rpartition(":")[0].strip("[]")


@dataclass(frozen=True)
class Alerts:
    """Administrator notifications through Alertmanager's v2 API (agent/report/alerts.py).
    Labels of an incident's alert: the built-in ones, then `labels`, then those of its
    class and severity, then `escalation_labels` when it needs a human."""

    url: str | None = None            # Alertmanager base URL, e.g. http://127.0.0.1:9093
    resend_s: float = 60.0            # live incidents are re-sent so Alertmanager keeps them firing
    timeout_s: float = 5.0
    labels: dict[str, str] = field(default_factory=dict)
    # Investigations go to the security team (routing labels; replaced whole when set).
    class_labels: dict[str, dict[str, str]] = field(default_factory=lambda: {
        "suspicious_activity": {"team": "security", "route": "investigation"}})
    severity_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    escalate_classes: tuple[str, ...] = ("security_breach", "suspicious_activity")
    escalation_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Metrics:
    listen: str | None = "127.0.0.1:9464"   # Prometheus /metrics; null: off


@dataclass(frozen=True)
class Breach:
    """What the process probe watches and the breach rules compare against (named lists
    in rules: "@service_cgroups", ...; executables by identity: see EXE_LISTS)."""

    shells: tuple[str, ...] = SHELLS              # shells and interpreters: exec always seen
    services: tuple[str, ...] = SERVICES          # network-facing services (ancestry)
    service_cgroups: tuple[str, ...] = ()         # or their cgroup v2 paths (globs)
    service_managers: tuple[str, ...] = SERVICE_MANAGERS  # start services: not their shell
    package_managers: tuple[str, ...] = PACKAGE_MANAGERS  # may write credential/agent files
    admin_tools: tuple[str, ...] = ADMIN_TOOLS    # root's user administration: not a breach
    debuggers: tuple[str, ...] = DEBUGGERS        # root's ptrace of a user's job: not a breach
    loaders: tuple[str, ...] = LOADERS            # ld.so: exec always seen, its program judged
    bpf_loaders: tuple[str, ...] = ("/usr/lib/systemd/systemd",)  # may load BPF programs
    bpf_loader_cgroups: tuple[str, ...] = ("/system.slice/swarm-agent*.service",)  # agents
    # where the system's own executables live (globs of the kernel-resolved path): below
    # a service, an executable elsewhere (a copied or dropped shell) is a breach
    system_exec_dirs: tuple[str, ...] = ("/usr/*", "/opt/*")
    allowed_modules: tuple[str, ...] = ("nvidia*", "wireguard")  # globs of module names
    credential_paths: tuple[str, ...] = CREDENTIAL_PATHS
    agent_paths: tuple[str, ...] = ("/etc/swarm-agent/",)  # plus state_dir, always
    read_paths: tuple[str, ...] = ("/etc/shadow*", "/etc/gshadow*")  # reads reported too
    # Executables (absolute paths or globs, verified against the kernel's inode) that hold
    # a terminal and a network connection by design: their sessions' shells are no
    # reverse shells (breach.stdio_network).
    remote_access: tuple[str, ...] = REMOTE_ACCESS
    # where the host's root filesystem is seen from the agent: "/", or in a container a
    # read-only bind mount of the host's / (executables and watched files are the host's)
    host_root: str = "/"


GPU_VIOLATION_ACTIONS = ("auto", "kill", "freeze", "report")


@dataclass(frozen=True)
class Gpu:
    """The GPU source (agent/sources/gpu.py): NVML in its own thread. No library, driver
    or GPU: status says "absent" and the agent runs on."""

    enabled: bool = True
    sample_s: float = 5.0             # counters and processes read this often (XIDs at once)
    nvml_library: str | None = None   # a libnvidia-ml.so path; null: the system's .so.1
    # GPU authorization (agent.gpugrant): workloads that may use GPUs, besides those a
    # scheduler authorizes through the control API; any other workload's GPU process is
    # a policy violation (policy.gpu_unauthorized), answered per on_violation.
    authorized: tuple[Grant, ...] = ()
    # auto (default): kill once the node is enrolled (gpu.authorized lists a workload, or a
    # scheduler has authorized one through the control API, ever), report before: an
    # agent installed before the scheduler makes grants must not kill every GPU job on the
    # machine. kill (the process), freeze (its cgroup), report: always that.
    on_violation: str = "auto"
    system_cgroups: tuple[str, ...] = SYSTEM_CGROUPS   # never acted on (and below them)
    system_exes: tuple[str, ...] = SYSTEM_EXES   # root, /system.slice/, no container only
    # Opens of character devices of this major are reported by the process probe at the
    # open (gpu.open: before the process has a GPU context); 0: not reported.
    device_major: int = 195


@dataclass(frozen=True)
class Investigation:
    """Evidence bundles of suspicious_activity investigations (agent/respond/investigate.py)."""

    refresh_s: float = 300.0          # collected again at most this often while it stays open
    timeout_s: float = 2.0            # collection stops here; what was gathered is kept
    max_bytes: int = 256 * 1024       # the bundle's JSON; longer lists are cut (marked)


@dataclass(frozen=True)
class FeedbackPolicy:
    """False-positive verdicts as scoped exceptions (agent/respond/feedbackbook.py)."""

    max_ttl_s: float = 365 * 86400.0  # longest lifetime of a record (default 30 days)


@dataclass(frozen=True)
class Config:
    state_dir: str = "/var/lib/swarm-agent"
    run_dir: str = "/run/swarm-agent"
    rules_file: str | None = None
    # Operators' own rule files (*.yaml), loaded after rules_file's and reloaded with
    # them; a directory that is missing or holds none adds nothing.
    rules_extra: str | None = "/etc/swarm-agent/rules.d"
    dry_run: bool = False
    log_level: str = "info"
    interfaces: tuple[str, ...] = ()  # empty: every non-loopback interface in the namespace
    allowlist: Allowlist = Allowlist()
    mitigation: MitigationPolicy = MitigationPolicy()
    enforce: Enforce = Enforce()
    probes: Probes = Probes()
    control: Control = Control()
    mesh: Mesh = Mesh()
    alerts: Alerts = Alerts()
    metrics: Metrics = Metrics()
    breach: Breach = Breach()
    gpu: Gpu = Gpu()
    policy: Policy = Policy()
    investigation: Investigation = Investigation()
    feedback: FeedbackPolicy = FeedbackPolicy()
    anomaly: AnomalyConfig = AnomalyConfig()   # online anomaly detection (issue 11)
    fleet: FleetConfig = FleetConfig()         # fleet decisions over NATS (issue 12)

    @property
    def rules_path(self) -> Path:
        return Path(self.rules_file) if self.rules_file else DEFAULT_RULES

    @property
    def rule_paths(self) -> list[Path]:
        """rules_path, then rules_extra's *.yaml files (when there are any): what the
        agent loads and reloads."""
        extra = Path(self.rules_extra) if self.rules_extra else None
        if extra is None or not extra.is_dir() or not any(extra.glob("*.yaml")):
            return [self.rules_path]
        return [self.rules_path, extra]

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir) / "agent.db"

    @property
    def control_socket(self) -> Path:
        return Path(self.run_dir) / "control.sock"


def load(path: str | Path | None) -> Config:
    """Read and validate a config file; None gives the defaults."""
    if path is None:
        return validate(Config())
    p = Path(path)
    try:   # not a regular file, over 1 MiB, not text, duplicate keys, nan, alias bombs
        data = read_yaml(p, "config", CONFIG_MAX_BYTES)
    except YamlError as e:
        raise ConfigError(str(e)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a mapping of keys to values")
    return validate(_build(Config, data, ""))


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    _checked(configcheck.items, prefix.rstrip(".") or "config", data)
    for key in data:
        if prefix == "breach." and key in REPLACED:
            raise ConfigError(f"breach.{key} is no longer read (process names can be forged): "
                              f"list the executables' paths in breach.{REPLACED[key]} instead")
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{configcheck.name(key)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if key == "gpu.authorized":
        return _checked(gpugrant.parse_config, key, value)
    if get_origin(hint) is dict:
        return _mapping(hint, value, key)
    if is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    text = str(hint)
    item = get_args(hint)[0] if text.startswith("tuple") and get_args(hint) else None
    if item is int or is_dataclass(item):   # ports, policy.egress rules
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list")
        _checked(configcheck.items, key, value)
        if item is int:
            return tuple(_checked(configcheck.number, key, v, True) for v in value)
        return tuple(_build(item, v, f"{key}[{i}].") for i, v in enumerate(value))
    if text.startswith("tuple"):
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings")
        _checked(configcheck.items, key, value)
        return tuple(_checked(configcheck.text, key, v) for v in value)
    if value is None and "None" in text:
        return None
    if hint is bool or text == "bool | None":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false")
        return value
    if hint is int or text.startswith("int"):   # finite, within its declared bounds
        return _checked(configcheck.number, key, value, True)
    if hint is float or text.startswith("float"):
        return _checked(configcheck.number, key, value, False)
    return _checked(configcheck.text, key, value)


def _checked(check: Any, key: str, *args: Any) -> Any:
    try:
        return check(key, *args)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _mapping(hint: Any, value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key} must be a mapping with string keys")
    _checked(configcheck.items, key, value)
    for k in value:
        _checked(configcheck.text, f"{key} key", k)
    value_hint = get_args(hint)[1]
    return {k: _coerce(value_hint, v, f"{key}.{k}") for k, v in value.items()}


def _check_networks(key: str, values: tuple[str, ...]) -> None:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {v!r} is not an IP address or CIDR") from None


def validate(cfg: Config) -> Config:
    """Checks that need more than a type; raises ConfigError."""
    cfg.anomaly.check()
    for name in ("management", "mesh", "load_balancers"):
        _check_networks(f"allowlist.{name}", getattr(cfg.allowlist, name))
    rr = cfg.enforce.reroute
    for key, val, version in (("sinkhole_v4", rr.sinkhole_v4, 4), ("sinkhole_v6", rr.sinkhole_v6, 6)):
        if val is None:
            continue
        try:
            if ipaddress.ip_address(val).version != version:
                raise ValueError
        except ValueError:
            raise ConfigError(f"enforce.reroute.{key}: {val!r} is not an IPv{version} address") from None
    _check_bounds(cfg)
    iso_ttl = cfg.mitigation.isolation_ttl_s
    if iso_ttl is not None and not 0 < iso_ttl <= cfg.mitigation.max_ttl_s:
        raise ConfigError("mitigation.isolation_ttl_s must be null (until released) or "
                          "greater than 0 and at most mitigation.max_ttl_s")
    if cfg.mitigation.max_ttl_s < cfg.mitigation.default_ttl_s:
        raise ConfigError("mitigation.max_ttl_s must not be below mitigation.default_ttl_s")
    if cfg.probes.attach_mode not in ATTACH_MODES:
        raise ConfigError(f"probes.attach_mode must be one of {', '.join(ATTACH_MODES)} "
                          f"(got {cfg.probes.attach_mode[:40]!r})")
    if not cfg.probes.process_owners.startswith("/"):
        raise ConfigError("probes.process_owners must be an absolute path")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level must be one of debug, info, warning, error")
    if cfg.rules_file is not None and not configcheck.exists(cfg.rules_file):
        raise ConfigError(f"rules_file {cfg.rules_file} does not exist")
    if cfg.rules_extra is not None and os.path.exists(cfg.rules_extra) \
            and not os.path.isdir(cfg.rules_extra):
        raise ConfigError(f"rules_extra {cfg.rules_extra} is not a directory")
    _check_breach(cfg)
    if cfg.gpu.nvml_library is not None and not cfg.gpu.nvml_library.startswith("/"):
        raise ConfigError("gpu.nvml_library must be an absolute path (or null: the "
                          "system's libnvidia-ml.so.1)")
    _check_gpu_authorization(cfg.gpu)
    _check_control(cfg.control)
    _check_mesh(cfg.mesh)
    try:
        cfg.fleet.check(cfg.mesh.endpoint)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_alerts(cfg.alerts)
    if cfg.metrics.listen is not None:
        _check_host_port("metrics.listen", cfg.metrics.listen)
    try:
        policyconfig.check(cfg.policy, (*cfg.allowlist.management, *cfg.allowlist.mesh))
        policyconfig.check_exec(cfg.policy)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _check_gpu_authorization(g: Gpu) -> None:
    if g.on_violation not in GPU_VIOLATION_ACTIONS:
        raise ConfigError(f"gpu.on_violation must be one of {', '.join(GPU_VIOLATION_ACTIONS)} "
                          f"(got {g.on_violation[:40]!r})")
    _checked(gpugrant.parse_system_cgroups, "gpu.system_cgroups", g.system_cgroups)
    for exe in g.system_exes:
        if not exe.startswith("/"):
            raise ConfigError(f"gpu.system_exes: {exe[:80]!r} is not an absolute path")


def _check_control(c: Control) -> None:
    if c.listen is None:
        return
    host, sep, port = c.listen.rpartition(":")
    # Port 0 (any free port) is for tests; the server logs the port it got.
    if not sep or not host or not configcheck.port(port, low=0):
        raise ConfigError(f"control.listen: {c.listen!r} is not host:port")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(c, key)
        if path is None:
            raise ConfigError(f"control.{key} is required when control.listen is set "
                              "(the TCP listener only accepts mutual TLS)")
        if not configcheck.exists(path, "file"):
            raise ConfigError(f"control.{key}: {path} does not exist")


def _check_host_port(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not configcheck.port(port):
        raise ConfigError(f"{key}: {value!r} is not host:port")


def _check_bounds(cfg: Config) -> None:
    """Every numeric key within configcheck.BOUNDS: load() checks them as it builds the
    config; this holds a Config built in code (or the defaults) to the same ranges."""
    for key in configcheck.BOUNDS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if value is None:
            continue
        try:
            configcheck.number(key, value, isinstance(value, int))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_mesh(m: Mesh) -> None:
    if m.outbox_hard_max < m.outbox_max:
        raise ConfigError("mesh.outbox_hard_max must not be below mesh.outbox_max")
    if m.endpoint is None:
        return
    _check_host_port("mesh.endpoint", m.endpoint)
    for key in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(m, key)
        if path is None:
            raise ConfigError(f"mesh.{key} is required when mesh.endpoint is set "
                              "(the mesh is only reached over mutual TLS)")
        if not configcheck.exists(path, "file"):
            raise ConfigError(f"mesh.{key}: {path} does not exist")


_LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_alerts(a: Alerts) -> None:
    if a.url is not None and not a.url.startswith(("http://", "https://")):
        raise ConfigError(f"alerts.url: {a.url!r} is not an http:// or https:// URL")
    classes, severities = {c.value for c in EventClass}, {s.value for s in Severity}
    labelsets = {"alerts.labels": a.labels, "alerts.escalation_labels": a.escalation_labels}
    for key, table, known in (("class_labels", a.class_labels, classes),
                              ("severity_labels", a.severity_labels, severities)):
        for name, labels in table.items():
            if name not in known:
                raise ConfigError(f"alerts.{key}: unknown {key.split('_')[0]} {name!r} "
                                  f"(one of {', '.join(sorted(known))})")
            labelsets[f"alerts.{key}.{name}"] = labels
    for key, labels in labelsets.items():
        for label in labels:
            if not _LABEL_RE.match(label):
                raise ConfigError(f"{key}: {label!r} is not a valid Prometheus label name")
    for name in a.escalate_classes:
        if name not in classes:
            raise ConfigError(f"alerts.escalate_classes: unknown class {name!r} "
                              f"(one of {', '.join(sorted(classes))})")


def check_host_root(cfg: Config) -> None:
    """breach.host_root must exist (checked at start: a container mounts it at run time)."""
    if not configcheck.exists(cfg.breach.host_root, "dir"):
        raise ConfigError(f"breach.host_root: {cfg.breach.host_root} is not a directory (the "
                          "host's / as the agent sees it: mount it, or set /)")


def check_interfaces(cfg: Config) -> None:
    """Interfaces must exist in this network namespace (checked at start, not at load)."""
    for name in cfg.interfaces:
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise ConfigError(f"interfaces: no interface named {name!r} in this network namespace") from None


def _check_breach(cfg: Config) -> None:
    if not cfg.breach.host_root.startswith("/"):
        raise ConfigError(f"breach.host_root: {cfg.breach.host_root!r} is not an absolute path")
    for name in EXE_LISTS:
        for p in getattr(cfg.breach, name):
            if not p.startswith("/"):
                raise ConfigError(
                    f"breach.{name}: {p!r} is not an executable path (write e.g. /usr/bin/{p}: "
                    "executables are matched by the file they run, not by process name)")
    for name, paths in breach_lists(cfg).items():
        if name.endswith("_paths"):
            for p in paths:
                try:
                    split_pattern(p)
                except ValueError as e:
                    raise ConfigError(f"breach.{name}: {e}") from None


def split_pattern(pattern: str) -> tuple[str, str]:
    """A watch pattern as (how, text): "exact", "prefix" ("/etc/shadow*", "/root/.ssh/")
    or "suffix" ("*/.ssh/authorized_keys"); raises ValueError for anything else."""
    if "?" in pattern or "[" in pattern or len(pattern.encode()) > 255 or len(pattern) < 2:
        raise ValueError(f"{pattern!r} is not a watch pattern")
    if pattern.startswith("*") and "*" not in pattern[1:]:
        parts = pattern[1:].split("/")
        if len(parts) != 3 or parts[0] or not all(parts[1:]) or \
                any(len(p.encode()) >= 64 for p in parts):
            raise ValueError(f"{pattern!r}: a suffix pattern names a directory and a file in "
                             "it (\"*/.ssh/authorized_keys\")")
        return "suffix", pattern[1:]
    if not pattern.startswith("/") or "*" in pattern.rstrip("*") or pattern.endswith("**"):
        raise ValueError(f"{pattern!r} is not a watch pattern (\"/path\", \"/prefix*\", "
                         "\"/dir/\" or \"*suffix\")")
    if pattern.endswith("*") or pattern.endswith("/"):
        return "prefix", pattern.rstrip("*")
    return "exact", pattern


def breach_lists(cfg: Config) -> dict[str, tuple[str, ...]]:
    """The named lists breach rules refer to ("@shells"), from cfg.breach; agent_paths
    always include the state directory."""
    b = cfg.breach
    lists = {f.name: getattr(b, f.name) for f in fields(Breach)}
    lists["agent_paths"] = (*b.agent_paths, cfg.state_dir.rstrip("/") + "/")
    return lists
