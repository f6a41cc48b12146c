"""Authority: the response to a breach fits who acted.

A breach rule asks for node or service isolation; who may bring that about is decided
here, from the acting process's credentials as the kernel reported them (uid, euid,
cgroup, and cap_effective when an event carries it), in the initial user namespace (a
container's root mapped to uid 100000 is uid 100000 here).

- Privileged: real uid 0 (root, sudo, su: they set the real uid too), or, when the event
  carries `cap_effective`, a capability that amounts to root (ADMIN_CAPS). The rule's own
  response stands: a node-scoped breach isolates the node. A setuid-root program keeps
  the real uid of the user who ran it and counts as that user's: passwd, chsh or any
  setuid helper must not turn a user into someone who can bring down the node.
- Unprivileged (everyone else): it cannot bring down the node. Its breach is answered on
  what it owns, and the incident is escalated:
    * its cgroup when that cgroup is its own (own_cgroup): a service's unit, a login
      session's scope (/user.slice/user-1000.slice/session-3.scope), a container's; the
      service or session is isolated (network cut + freeze), as a service breach is --
      raised to the top of a subtree delegated to it (delegation_root), never one that
      also holds another user's processes (other_user), and never a system service's unit
      for a login user's uid (UID_MIN..UID_MAX: a user's cron job inside cron.service is not
      cron's to lose);
    * else (the root cgroup, a slice shared with others, PID 1's init.scope, unknown)
      its processes: KILL_PROCESS on the acting pid, which kills the members of its
      POSIX session that run as the same uid (agent.enforce.process), never anyone else's.
- Unknown (no uid in the evidence: not a process finding): the rule's response stands.

loginuid and sessionid never raise or lower authority, nor pick the target: a process
whose loginuid is unset may set it once (/proc/self/loginuid, unless the kernel runs with
loginuid-immutable), so they are named in the note for the security team, nothing more.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from agent.enforce.cgroup import CgroupError, cgroup2_mount
from agent.model import Finding, MitigationKind

# Breach responses that authority can narrow.
NARROWED_KINDS = (MitigationKind.ISOLATE_NODE, MitigationKind.ISOLATE_SERVICE)
UNSET_ID = 0xFFFFFFFF     # (u32)-1: the loginuid/sessionid of a process outside any login
# CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_SETGID, CAP_SETUID, CAP_NET_ADMIN,
# CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_MAC_ADMIN, CAP_BPF:
# each is, or leads in a step to, full control of the host.
ADMIN_CAPS = sum(1 << c for c in (1, 2, 3, 6, 7, 12, 16, 17, 19, 21, 33, 39))
_SHARED_UNITS = re.compile(r"^(init\.scope|.*\.slice)$")


@dataclass(frozen=True)
class Actor:
    """The acting process of a breach finding, from its evidence."""

    uid: int
    euid: int
    pid: int | None = None
    cgroup: str | None = None
    loginuid: int | None = None
    sessionid: int | None = None
    cap_effective: int | None = None

    @property
    def privileged(self) -> bool:
        """Real uid 0, or a root-equivalent capability. A setuid-root program (euid 0,
        real uid a user's: passwd, chsh, any setuid helper) acts for the user who ran it:
        letting it bring down the node would hand that power to every user."""
        if self.uid == 0:
            return True
        return self.cap_effective is not None and bool(self.cap_effective & ADMIN_CAPS)

    def owns_unit(self, cgroup: str | None) -> bool:
        """Whether a system service's unit (/system.slice/NAME.service) can be this actor's
        own: not for a login user's uid (UID_MIN..UID_MAX): a user's cron job inside
        cron.service, or a session inside ssh.service on a host without pam_systemd, runs
        in a daemon's unit shared with other users. Decided on the uid, which the kernel
        holds, not on loginuid, which a process whose loginuid is unset may set once."""
        if not cgroup or not re.match(r"^/system\.slice/.*\.service(/|$)", cgroup):
            return True
        return self.uid not in login_uids()

    def describe(self) -> str:
        """"uid 1000" with whatever else is known: "uid 1000 (euid 0, login uid 1000, session 3)"."""
        more = []
        if self.euid != self.uid:
            more.append(f"euid {self.euid}")
        if self.loginuid is not None and self.loginuid != UNSET_ID:
            more.append(f"login uid {self.loginuid}")
        if self.sessionid is not None and self.sessionid != UNSET_ID:
            more.append(f"session {self.sessionid}")
        return f"uid {self.uid}" + (f" ({', '.join(more)})" if more else "")


@dataclass(frozen=True)
class Answer:
    """The narrowed response: the finding as filed, the mitigation (None: report only),
    why. The incident is always escalated."""

    finding: Finding
    kind: MitigationKind | None
    target: str | None
    note: str
    params: Mapping[str, Any]


@functools.lru_cache(maxsize=1)
def login_uids(login_defs: str = "/etc/login.defs") -> range:
    """The uids of login users: UID_MIN..UID_MAX from login.defs (1000..60000 when it is
    unreadable); nobody (65534) and system users are outside."""
    found = {"UID_MIN": 1000, "UID_MAX": 60000}
    try:
        for line in Path(login_defs).read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] in found and fields[1].isdigit():
                found[fields[0]] = int(fields[1])
    except OSError:
        pass
    return range(found["UID_MIN"], found["UID_MAX"] + 1)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def actor_of(evidence: Mapping[str, Any]) -> Actor | None:
    """The acting process, or None when the evidence names no credentials."""
    uid, euid = _int(evidence.get("uid")), _int(evidence.get("euid"))
    if uid is None or euid is None:
        return None
    cgroup = evidence.get("cgroup")
    return Actor(uid, euid, _int(evidence.get("pid")),
                 cgroup if isinstance(cgroup, str) else None,
                 _int(evidence.get("loginuid")), _int(evidence.get("sessionid")),
                 _int(evidence.get("cap_effective")))


def own_cgroup(path: str | None) -> bool:
    """Whether cgroup `path` belongs to one workload (a service, a session scope, a
    container) rather than being shared: never the root, a slice (a grouping of several
    units: user.slice, user-1000.slice, system.slice) or init.scope (PID 1)."""
    if not path or not path.startswith("/") or ".." in path.split("/"):
        return False
    leaf = path.rstrip("/").rsplit("/", 1)[-1]
    return bool(leaf) and not _SHARED_UNITS.match(leaf)


def delegation_root(path: str, uid: int, root: Path | None = None) -> str:
    """The cgroup the actor cannot move its processes out of: `path` raised to its
    top-most ancestor below which the actor may migrate processes -- while the parent's
    cgroup.procs is the actor's (a delegated subtree), the actor could move a frozen
    process to a sibling, so the parent is the target. `path` itself when the hierarchy
    cannot be read (the actor's uid owns nothing above it then either, as far as we know)."""
    try:
        root = root or cgroup2_mount()
    except CgroupError:
        return path
    parts = [p for p in path.split("/") if p]
    top = len(parts)
    while top > 1:
        try:
            owner = os.stat(root.joinpath(*parts[:top - 1], "cgroup.procs")).st_uid
        except OSError:
            break
        if owner != uid:
            break
        top -= 1
    return "/" + "/".join(parts[:top])


def other_user(path: str, uid: int, root: Path | None = None,
               proc: Path = Path("/proc")) -> int | None:
    """A uid other than root's and `uid` that runs a process in cgroup `path` or below it
    (None when there is none, or the hierarchy cannot be read): such a cgroup is shared
    (an ssh.service or cron.service holding several users' sessions, php-fpm pools of
    several users), and isolating it would freeze and cut that user's processes too."""
    try:
        top = (root or cgroup2_mount()).joinpath(*[p for p in path.split("/") if p])
    except CgroupError:
        return None
    for d, _, _ in os.walk(top):
        try:
            pids = Path(d, "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                status = (proc / pid / "status").read_text()
            except OSError:
                continue
            real = next((int(line.split()[1]) for line in status.splitlines()
                         if line.startswith("Uid:")), None)
            if real is not None and real not in (0, uid):
                return real
    return None


def narrow(finding: Finding, kind: MitigationKind) -> Answer | None:
    """The response an unprivileged actor's breach gets instead of `kind`; None when the
    rule's own response stands (a privileged or unknown actor, or not an isolation)."""
    if kind not in NARROWED_KINDS:
        return None
    actor = actor_of(finding.evidence)
    if actor is None or actor.privileged:
        return None
    who = f"actor {actor.describe()} is unprivileged"
    asked = "the node" if kind is MitigationKind.ISOLATE_NODE else f"service {finding.entity}"
    target, why = None, ""
    if own_cgroup(actor.cgroup) and actor.owns_unit(actor.cgroup):
        assert actor.cgroup is not None
        try:
            root: Path | None = cgroup2_mount()     # read once for both walks below
        except CgroupError:
            root = None
        target = delegation_root(actor.cgroup.rstrip("/"), actor.uid, root)
        if not own_cgroup(target):
            target = None
        elif (other := other_user(target, actor.uid, root)) is not None:
            target, why = None, f" (it also holds processes of uid {other})"
    if target is not None:
        assert actor.cgroup is not None
        own = "its own cgroup"
        if target != actor.cgroup.rstrip("/"):
            own = (f"the cgroup delegated to it (it could move its processes anywhere "
                   f"below, out of {actor.cgroup.rstrip('/')})")
        note = f"{finding.rule}: {who}: isolating {own} {target} instead of {asked}"
        if kind is MitigationKind.ISOLATE_SERVICE and finding.entity == f"cgroup:{target}":
            note = f"{finding.rule}: {who}: isolating {own} {target}"
        filed = _filed(finding, f"cgroup:{target}", note)
        return Answer(filed, MitigationKind.ISOLATE_SERVICE, target, note, {})
    if actor.pid is None or actor.pid <= 1:
        # Nothing of its own to act on (cannot happen with the process probe's events):
        # reported and escalated, still never the node.
        note = f"{finding.rule}: {who} and names no process of its own: reported only"
        return Answer(_filed(finding, f"user:{actor.uid}", note), None, None, note, {})
    note = (f"{finding.rule}: {who} and its cgroup {actor.cgroup or '(unknown)'} is not its "
            f"own{why}: killing its processes (the session of pid {actor.pid}, uid {actor.uid} "
            f"only) instead of isolating {asked}")
    filed = _filed(finding, f"user:{actor.uid}", note)
    params: dict[str, Any] = {"uid": actor.uid}
    if (ppid := _int(finding.evidence.get("ppid"))) is not None and ppid > 1:
        params["ppid"] = ppid     # its session, when the actor is gone by the time of the kill
    return Answer(filed, MitigationKind.KILL_PROCESS, str(actor.pid), note, params)


def _filed(finding: Finding, entity: str, note: str) -> Finding:
    return replace(finding, entity=entity,
                   evidence={**finding.evidence, "authority": note, "asked_entity": finding.entity})
