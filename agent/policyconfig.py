"""The `policy:` section of the config: egress policy (agent/enforce/egress.py applies it).

An egress rule names who may not reach what:
    name          a short name (letters, digits, . _ -): incident entities and nft comments
    cgroups       cgroup v2 paths whose processes' sockets are denied (the whole subtree:
                  "/kubepods.slice" covers every pod under it); matched in the output hook
                  by the socket's cgroup, which the kernel sets and the process cannot forge
    interfaces    input interfaces of forwarded traffic ("docker0", "br-*", "cali*"): a
                  bridged container's packets leave its own network namespace and reach
                  this host's forward hook with no socket, so they are matched by where
                  they came in, which the container cannot change either
    destinations  CIDRs that may not be reached (none: every destination, by port)
    ports         destination ports (none: every port, every protocol)
    proto         tcp, udp or any (with ports, any means tcp and udp)

Management and mesh networks are never cut: the egress chains accept them first, and a
destination lying wholly inside them is refused here (it could never take effect).

Values here are checked to the character because they are written into an nft text
transaction (libnftables 1.0.6's JSON has no `socket cgroupv2`): cgroup paths and
interface names carry no quotes, spaces or anything else nft would read as syntax.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from typing import Iterable

METADATA_V4 = "169.254.169.254/32"     # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean...
METADATA_V6 = "fd00:ec2::254/128"      # AWS's IPv6 instance metadata endpoint
# Where the usual workload managers put their workloads (whole subtrees, present or not):
# Kubernetes (systemd and cgroupfs drivers), Docker's cgroupfs driver, libvirt/nspawn
# machines. Not users' login sessions (/user.slice): the operators' own shells and tools
# live there and often read the metadata service; add it where tenants log in to the
# host itself. Docker's systemd driver puts each
# container beside the host's services (/system.slice/docker-ID.scope): its bridged
# containers are covered by the interfaces below; a host-network one by its own cgroup.
WORKLOAD_CGROUPS = ("/kubepods.slice", "/kubepods", "/docker", "/machine.slice")
# Docker's default and user bridges, the CNI bridge, Calico's and Cilium's pod interfaces,
# libvirt's networks (the VMs of /machine.slice), podman's and LXD's bridges.
WORKLOAD_INTERFACES = ("docker0", "br-*", "cni0", "cali*", "lxc*", "virbr*", "podman*", "lxdbr*")
PROTOS = ("tcp", "udp", "any")
MAX_RULES = 256

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
# A cgroup path as nft text takes it quoted: systemd and container runtimes use these.
_CGROUP_RE = re.compile(r"^(/[A-Za-z0-9_.:@=+,-]+)+$")
_CGROUP_GLOB_RE = re.compile(r"^(/[A-Za-z0-9_.:@=+,*-]+)+$")     # file rules match in Python
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}\*?$")


@dataclass(frozen=True)
class EgressRule:
    name: str = ""
    cgroups: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    proto: str = "any"

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(d, strict=False) for d in self.destinations]


# The default: no workload reaches the cloud's instance metadata service (credentials of
# the machine's cloud identity, user data with bootstrap secrets). The host's own services
# (cloud-init, the provider's agents: /system.slice) keep it. Mining-pool ports are not
# denied by default: 3333, 4444, 5555, 7777, 14444 are also used by ordinary software
# (adb, game servers, dev servers); packaging/config.yaml carries them as an example.
METADATA = EgressRule(name="metadata", cgroups=WORKLOAD_CGROUPS,
                      interfaces=WORKLOAD_INTERFACES, destinations=(METADATA_V4, METADATA_V6))


EXEC_ACTIONS = ("report", "kill", "freeze")
EXEC_HASH_MAX_BYTES = 64 << 20      # larger executables are not hashed (exe_sha256 None)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTAINER_RE = re.compile(r"^[0-9a-f]{12,64}$")
# -- file policy -----------------------------------------------------------------------
# A file rule names who may not open what (agent/filepolicy.py; refused in the kernel by
# fanotify permission events, so the open fails with EPERM):
#     name        as for egress; the incident entity is file:NAME:cgroup:/the/opener's/cgroup
#     paths       absolute paths: a file (its inode: hard links, bind mounts and renames
#                 of it are covered), or a directory written with a trailing "/" (its files
#                 and those created later, its subdirectories to MAX_DEPTH levels)
#     cgroups     cgroup v2 subtrees whose processes may not open them
#     containers  container ids (64 hex digits) whose processes may not open them
MAX_FILE_RULES = 32
MAX_FILE_PATHS = 64      # per rule
_CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileRule:
    name: str = ""
    paths: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()


# The default: no workload opens the agent's own configuration (its control API's TLS key,
# mesh and Alertmanager credentials). Only the agent's files: every open of a marked file
# waits for the agent's answer, so a default on files the host itself opens at login
# (/etc/shadow, /root/.ssh/) would tie the operators' logins to the agent's health; add
# those where that trade is wanted (packaging/config.yaml shows kubelet's credentials).
# Docker's systemd cgroup driver (its default on cgroup v2) puts each container beside the
# host's services: a glob names them (file rules are judged in Python; nft cannot glob).
DOCKER_SCOPES = "/system.slice/docker-*.scope"
AGENT_SECRETS = FileRule(name="agent-config", paths=("/etc/swarm-agent/",),
                         cgroups=(*WORKLOAD_CGROUPS, DOCKER_SCOPES))


@dataclass(frozen=True)
class Policy:
    egress: tuple[EgressRule, ...] = (METADATA,)
    # How often the egress chains' counters are read: an attempt becomes an incident
    # within about this long (the drop itself is immediate, in the kernel).
    egress_poll_s: float = 1.0
    # File policy (agent/filepolicy.py): paths a workload may not open.
    files: tuple[FileRule, ...] = (AGENT_SECRETS,)
    # The exec policy (agent/rules/exec.yaml): named lists its deny rules read (@name),
    # empty by default. Paths are globs of the kernel-resolved executable path; hashes
    # SHA-256 hex of the file executed; users uids (real or effective); cgroups globs of
    # cgroup v2 paths; containers ids (full or a 12+ digit prefix).
    exec_denied_paths: tuple[str, ...] = ()
    exec_denied_sha256: tuple[str, ...] = ()
    exec_denied_users: tuple[int, ...] = ()
    exec_denied_cgroups: tuple[str, ...] = ()
    exec_denied_containers: tuple[str, ...] = ()
    # Where exec from a workload-writable location (tmp, shm, memfd, deleted) is judged:
    # cgroup subtrees (the egress policy's workload managers by default) ...
    exec_workload_cgroups: tuple[str, ...] = WORKLOAD_CGROUPS
    # ... and what is done then: report (default: `go run`, runc's memfd re-exec and build
    # tools exec from /tmp or memfds legitimately), kill (the process) or freeze (its cgroup).
    exec_writable_action: str = "report"
    exec_hash_max_bytes: int = EXEC_HASH_MAX_BYTES


def exec_lists(policy: Policy) -> dict[str, tuple]:
    """The named lists exec rules refer to ("@exec_denied_paths"); workload cgroups as
    globs of their subtrees."""
    return {"exec_denied_paths": policy.exec_denied_paths,
            "exec_denied_sha256": policy.exec_denied_sha256,
            "exec_denied_users": policy.exec_denied_users,
            "exec_denied_cgroups": policy.exec_denied_cgroups,
            "exec_denied_containers": tuple(c + "*" for c in policy.exec_denied_containers),
            "exec_workload_cgroups": tuple(g for c in policy.exec_workload_cgroups
                                           for g in (c, c.rstrip("/") + "/*"))}


EXEC_LIST_NAMES = frozenset(exec_lists(Policy()))


# Cgroups a freeze must never reach, however a pattern is spelt: the host's services, its
# init, the operators' login sessions.
_HOST_CGROUPS = ("/system.slice", "/system.slice/ssh.service", "/system.slice/sshd.service",
                 "/system.slice/containerd.service", "/system.slice/docker.service",
                 "/system.slice/systemd-journald.service", "/init.scope", "/user.slice",
                 "/user.slice/user-0.slice/session-1.scope")


def _host_cgroup_covered(pattern: str) -> str | None:
    """The first of _HOST_CGROUPS that `pattern` (a glob covering its subtree) matches."""
    pat = pattern.rstrip("/") or "/"
    for c in _HOST_CGROUPS:
        if fnmatch.fnmatchcase(c, pat) or fnmatch.fnmatchcase(c, pat + "/*") or \
                c.startswith(pat.rstrip("*") + "/") and "*" not in pat.rstrip("*"):
            return c
    return None


def check_exec(policy: Policy) -> None:
    """Raise ValueError (one sentence naming the key) for exec policy values that could
    never match as the operator means them."""
    for p in policy.exec_denied_paths:
        if not p.startswith("/"):
            raise ValueError(f"policy.exec_denied_paths: {p[:80]!r} is not an absolute path "
                             "or glob (\"/usr/bin/nc\", \"/opt/miners/*\")")
    for h in policy.exec_denied_sha256:
        if not _SHA256_RE.match(h):
            raise ValueError(f"policy.exec_denied_sha256: {h[:80]!r} is not a SHA-256 in "
                             "lower-case hex (64 digits)")
    for u in policy.exec_denied_users:
        if u < 0:
            raise ValueError(f"policy.exec_denied_users: {u} is not a uid")
    for c in (*policy.exec_denied_cgroups, *policy.exec_workload_cgroups):
        if not c.startswith("/") or c == "/":
            raise ValueError(f"policy.exec_*_cgroups: {c[:80]!r} is not a cgroup v2 path "
                             "(or glob) below the root")
    for c in policy.exec_denied_containers:
        if not _CONTAINER_RE.match(c):
            raise ValueError(f"policy.exec_denied_containers: {c[:80]!r} is not a container "
                             "id (12 to 64 lower-case hex digits)")
    if policy.exec_writable_action == "freeze":
        for c in policy.exec_workload_cgroups:
            hit = _host_cgroup_covered(c)
            if hit:
                raise ValueError(f"policy.exec_workload_cgroups: {c} covers {hit}, the host's "
                                 "own services or the operators' sessions: "
                                 "exec_writable_action freeze would freeze them (name the "
                                 "workloads' cgroups, e.g. /system.slice/docker-*.scope)")
    if policy.exec_writable_action not in EXEC_ACTIONS:
        raise ValueError(f"policy.exec_writable_action must be one of "
                         f"{', '.join(EXEC_ACTIONS)} (got {policy.exec_writable_action[:20]!r})")
    if not 0 < policy.exec_hash_max_bytes <= 1 << 32:
        raise ValueError("policy.exec_hash_max_bytes must be between 1 and 4294967296")


def check(policy: Policy, never_cut: Iterable[str]) -> None:
    """Raise ValueError (one sentence naming the key) for a policy that cannot be applied
    exactly as written; `never_cut` are the management and mesh networks."""
    if len(policy.egress) > MAX_RULES:
        raise ValueError(f"policy.egress has {len(policy.egress)} rules (at most {MAX_RULES})")
    keep = [ipaddress.ip_network(n, strict=False) for n in never_cut]
    seen: set[str] = set()
    for i, rule in enumerate(policy.egress):
        key = f"policy.egress[{i}]"
        if not _NAME_RE.match(rule.name):
            raise ValueError(f"{key}.name must be 1-40 letters, digits, '.', '_' or '-' "
                             f"(got {rule.name[:50]!r})")
        key = f"policy.egress[{rule.name}]"
        if rule.name in seen:
            raise ValueError(f"{key}: the name {rule.name!r} is used twice")
        seen.add(rule.name)
        _check_rule(rule, key, keep)
    check_files(policy.files)


def _check_rule(rule: EgressRule, key: str, keep: list) -> None:
    if not rule.cgroups and not rule.interfaces:
        raise ValueError(f"{key} applies to nobody: give cgroups, interfaces or both")
    if not rule.destinations and not rule.ports:
        raise ValueError(f"{key} would deny everything to everyone it covers: give "
                         "destinations, ports or both")
    for c in rule.cgroups:
        if c == "/" or not _CGROUP_RE.match(c) or "/../" in c + "/" or "/./" in c + "/":
            raise ValueError(f"{key}.cgroups: {c[:80]!r} is not a cgroup v2 path below the "
                             "root (\"/kubepods.slice\", letters, digits and . _ - : @ = + ,)")
    for name in rule.interfaces:
        if not _IFACE_RE.match(name):
            raise ValueError(f"{key}.interfaces: {name[:40]!r} is not an interface name "
                             "(at most 15 characters, optionally ending in *)")
    for d in rule.destinations:
        try:
            net = ipaddress.ip_network(d, strict=False)
        except ValueError:
            raise ValueError(f"{key}.destinations: {d[:80]!r} is not an IP address or CIDR") from None
        if net.version == 6 and net.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")):
            # Such packets leave as IPv4: an ip6 rule would never match them.
            raise ValueError(f"{key}.destinations: {d} is an IPv4-mapped IPv6 address; "
                             "write the IPv4 address")
        if any(net.version == k.version and net.subnet_of(k) for k in keep):
            raise ValueError(f"{key}.destinations: {d} lies inside the management or mesh "
                             "allowlist, which egress policy never cuts")
    for p in rule.ports:
        if not 0 < p < 65536:
            raise ValueError(f"{key}.ports: {p} is not a port (1-65535)")
    if rule.proto not in PROTOS:
        raise ValueError(f"{key}.proto must be one of {', '.join(PROTOS)} (got {rule.proto[:20]!r})")


def check_files(rules: tuple[FileRule, ...]) -> None:
    """Raise ValueError (one sentence naming the key) for a file policy that cannot be
    applied exactly as written. Paths that do not exist are not an error: status says so."""
    if len(rules) > MAX_FILE_RULES:
        raise ValueError(f"policy.files has {len(rules)} rules (at most {MAX_FILE_RULES})")
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if not _NAME_RE.match(rule.name):
            raise ValueError(f"policy.files[{i}].name must be 1-40 letters, digits, '.', '_' "
                             f"or '-' (got {rule.name[:50]!r})")
        key = f"policy.files[{rule.name}]"
        if rule.name in seen:
            raise ValueError(f"{key}: the name {rule.name!r} is used twice")
        seen.add(rule.name)
        if not rule.cgroups and not rule.containers:
            raise ValueError(f"{key} applies to nobody: give cgroups, containers or both")
        if not rule.paths:
            raise ValueError(f"{key}.paths is empty: give the files or directories (\"/dir/\") "
                             "its workloads may not open")
        if len(rule.paths) > MAX_FILE_PATHS:
            raise ValueError(f"{key}.paths has {len(rule.paths)} entries (at most {MAX_FILE_PATHS})")
        for c in rule.cgroups:
            # "/" would put the operators' shells and the host's services under the rule.
            if c == "/" or not _CGROUP_GLOB_RE.match(c) or "/../" in c + "/" or "/./" in c + "/":
                raise ValueError(f"{key}.cgroups: {c[:80]!r} is not a cgroup v2 path below the "
                                 "root (\"/kubepods.slice\", \"/system.slice/docker-*.scope\": "
                                 "letters, digits, . _ - : @ = + , and * in a glob)")
            hit = _host_cgroup_covered(c) if "*" in c else None
            if hit:
                raise ValueError(f"{key}.cgroups: the glob {c} covers {hit}, the host's own "
                                 "services or the operators' sessions: name those exactly")
        for c in rule.containers:
            if not _CONTAINER_ID_RE.match(c):
                raise ValueError(f"{key}.containers: {c[:80]!r} is not a container id "
                                 "(64 lower-case hex digits)")
        for p in rule.paths:
            _check_file_path(p, f"{key}.paths")


def _check_file_path(p: str, key: str) -> None:
    if not p.startswith("/") or "\0" in p or len(p) > 1024:
        raise ValueError(f"{key}: {p[:80]!r} is not an absolute path")
    parts = p.rstrip("/").split("/")[1:]
    if any(part in ("", ".", "..") for part in parts) and p != "/":
        raise ValueError(f"{key}: {p[:80]!r} is not a plain absolute path (no //, . or ..)")
    if p.rstrip("/") in ("", "/dev") or p.rstrip("/").split("/")[1] in ("proc", "sys"):
        raise ValueError(f"{key}: {p!r} cannot be denied (the whole root or a kernel "
                         "filesystem: every open on the host would wait for the agent)")
    own = next((d for d in _agents_own_files() if _overlaps(p.rstrip("/"), d)), None)
    if own is not None:
        # The thread that answers the opens may itself open these (a lazy import, a
        # traceback's source lines): waiting on its own answer, it would hang them all.
        raise ValueError(f"{key}: {p!r} covers the agent's own code, interpreter or a file "
                         f"its libraries read ({own}), which the agent must open to answer")


# What the C libraries under the agent open while its thread holds the interpreter's lock
# (the dynamic loader for ctypes and extension modules: NVML is looked for every minute;
# libc's time zone and user databases): such an open of a marked file waits for the
# answering thread, which needs that lock: every marked open on the host would hang.
LIBRARY_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
                 "/etc/ld.so.preload", "/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32",
                 "/usr/lib64", "/usr/local/lib", "/etc/localtime", "/usr/share/zoneinfo",
                 "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")


def _agents_own_files() -> set[str]:
    """The interpreter, its library directories, the agent's package, the libraries
    mapped into it and what the loader and libc read, as named and as resolved."""
    paths = {k: v for k, v in sysconfig.get_paths().items()
             if k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs = [*paths.values(), sys.executable, os.path.dirname(os.path.abspath(__file__)),
            *LIBRARY_FILES, *_mapped_dirs()]
    return {p.rstrip("/") for d in dirs for p in (d, os.path.realpath(d))}


def _mapped_dirs() -> set[str]:
    """The files mapped into this process: a shared object's directory (its neighbours
    may be loaded next), any other file itself (the interpreter's executable)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    files = {parts[5] for parts in (ln.split(None, 5) for ln in lines)
             if len(parts) == 6 and parts[5].startswith("/")}
    return {os.path.dirname(f) if ".so" in os.path.basename(f) else f for f in files}


def _overlaps(path: str, d: str) -> bool:
    return d == path or d.startswith(path + "/") or path.startswith(d + "/")
