"""Authority in the responder: an unprivileged actor's breach is answered on what it owns
(its cgroup, else its processes), escalated, never with node isolation; root's stands.
A real SQLite file and the recording enforcer (tests/unit/test_respond_isolation.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import Allowlist, Config
from agent.enforce.base import DryRunEnforcer
from agent.model import EventClass, Finding, IncidentState, MitigationKind, Severity
from agent.respond import authority, policy
from agent.respond.engine import Responder
from agent.state.store import Store

BASE_S = 1_700_000_000.0
SESSION = "/user.slice/user-1000.slice/session-3.scope"


def breach(action: str = "isolate_node", entity: str = "node", *,
           rule: str = "breach.credential_write", **fields) -> Finding:
    evidence = {"pid": 4242, "uid": 1000, "euid": 1000, "cgroup": "/", "comm": "nginx",
                **fields}
    return Finding(rule, 1, EventClass.SECURITY_BREACH, Severity.CRITICAL, entity, action,
                   1_000_000_000, 1_200_000_000, evidence)


@pytest.fixture
def make(tmp_path: Path):
    stores: list[Store] = []

    def build() -> tuple[Responder, Store, DryRunEnforcer]:
        cfg = Config(state_dir=str(tmp_path), allowlist=Allowlist(management=("192.0.2.0/24",)))
        store = Store(tmp_path / "agent.db")
        stores.append(store)
        enf = DryRunEnforcer()
        r = Responder(cfg, store, enf, clock=lambda: BASE_S + 2.0,
                      to_wall=lambda ns: BASE_S + ns / 1e9)
        return r, store, enf
    yield build
    for s in stores:
        s.close()


def notes(store: Store, incident_id: str) -> str:
    return "\n".join(e.text for e in store.incident_events(incident_id))


def test_unprivileged_actor_in_the_root_cgroup_gets_its_processes_killed(make):
    r, store, enf = make()
    inc = r.handle(breach(cgroup="/"))
    assert enf.actions == [("apply", "kill_process", "4242")]
    (m,) = store.mitigations()
    assert (m.kind, m.target, m.params["uid"]) == (MitigationKind.KILL_PROCESS, "4242", 1000)
    assert m.expires_at is not None                     # a kill is recorded with a lifetime
    assert (inc.entity, inc.state) == ("user:1000", IncidentState.ESCALATED)
    text = notes(store, inc.id)
    assert "actor uid 1000 is unprivileged" in text and "instead of isolating the node" in text


@pytest.mark.parametrize("cgroup, uid", [
    (SESSION, 1000), ("/system.slice/nginx.service", 33),
    ("/kubepods/burstable/pod1/cri-containerd-ab.scope", 100000)])
def test_unprivileged_actor_in_its_own_cgroup_gets_that_cgroup_isolated(make, cgroup, uid):
    r, store, enf = make()
    inc = r.handle(breach(cgroup=cgroup, uid=uid, euid=uid))
    assert enf.actions == [("apply", "isolate_service", cgroup)]
    assert (inc.entity, inc.state) == (f"cgroup:{cgroup}", IncidentState.ESCALATED)
    assert f"isolating its own cgroup {cgroup} instead of the node" in notes(store, inc.id)


def test_service_shell_fallback_to_the_node_is_narrowed_too(make):
    # breach.service_shell fell back to the node (no service cgroup): the colleague's
    # detector still says "node"; the responder answers the actor's session instead.
    r, store, enf = make()
    inc = r.handle(breach(rule="breach.service_shell", cgroup=SESSION,
                          scope="node", scope_fallback="no service cgroup"))
    assert [a[1] for a in enf.actions] == ["isolate_service"]
    assert inc.entity == f"cgroup:{SESSION}"


@pytest.mark.parametrize("cgroup", ["/", "/user.slice", "/user.slice/user-1000.slice",
                                    "/init.scope", None, "relative/x.scope"])
def test_shared_or_unknown_cgroups_are_never_isolated_for_an_unprivileged_actor(make, cgroup):
    r, store, enf = make()
    r.handle(breach(cgroup=cgroup))
    assert enf.actions == [("apply", "kill_process", "4242")]


def test_service_scoped_breach_of_a_shared_slice_kills_instead(make):
    r, _, enf = make()
    r.handle(breach("isolate_service", "cgroup:/user.slice", rule="breach.service_shell",
                    cgroup="/user.slice"))
    assert enf.actions == [("apply", "kill_process", "4242")]


@pytest.mark.parametrize("fields", [
    {"uid": 0, "euid": 0},
    {"uid": 0, "euid": 1000},                           # root that dropped euid for a while
    {"uid": 1000, "euid": 1000, "cap_effective": 1 << 21},   # CAP_SYS_ADMIN
])
def test_privileged_actor_keeps_node_isolation(make, fields):
    r, store, enf = make()
    inc = r.handle(breach(**fields))
    assert enf.actions == [("apply", "isolate_node", "node")]
    assert inc.entity == "node" and "unprivileged" not in notes(store, inc.id)


def test_harmless_capabilities_do_not_make_a_user_privileged(make):
    r, _, enf = make()
    r.handle(breach(cap_effective=1 << 10))              # CAP_NET_BIND_SERVICE
    assert enf.actions[0][1] == "kill_process"


@pytest.mark.parametrize("fields", [{"uid": None}, {"uid": True, "euid": True},
                                    {"uid": -1}, {"euid": "1000"}])
def test_without_credentials_the_rule_response_stands(make, fields):
    r, _, enf = make()
    r.handle(breach(**fields))
    assert enf.actions == [("apply", "isolate_node", "node")]


def test_a_setuid_root_program_acts_for_the_user_who_ran_it(make):
    """passwd, chsh or any setuid helper: euid 0, but the real uid is the user's; letting
    it isolate the node would give every user that power."""
    r, store, enf = make()
    inc = r.handle(breach(uid=1000, euid=0))
    assert [a[1] for a in enf.actions] == ["kill_process"]
    assert "actor uid 1000 (euid 0) is unprivileged" in notes(store, inc.id)


@pytest.mark.parametrize("cgroup, uid, loginuid, answer", [
    ("/system.slice/cron.service", 1000, 1000, "kill_process"),     # a user's cron job
    ("/system.slice/ssh.service", 1000, None, "kill_process"),      # no pam_systemd
    (SESSION, 1000, 1000, "isolate_service"),
    (SESSION, 1000, authority.UNSET_ID, "isolate_service"),
    ("/system.slice/nginx.service", 33, authority.UNSET_ID, "isolate_service"),   # a worker
    # loginuid is settable once by a process whose loginuid is unset: it changes nothing
    ("/system.slice/nginx.service", 33, 1000, "isolate_service"),
    ("/system.slice/docker-abc.scope", 100000, None, "isolate_service"),   # a container
    ("/system.slice/legacy.service", 65534, None, "isolate_service"),      # runs as nobody
])
def test_a_login_users_uid_owns_no_system_service_unit(make, cgroup, uid, loginuid, answer):
    r, _, enf = make()
    r.handle(breach(cgroup=cgroup, uid=uid, euid=uid, loginuid=loginuid))
    assert [a[1] for a in enf.actions] == [answer]


def test_login_and_session_are_named_in_the_note(make):
    r, store, _ = make()
    inc = r.handle(breach(loginuid=1000, sessionid=7))
    assert "actor uid 1000 (login uid 1000, session 7) is unprivileged" in notes(store, inc.id)
    inc = r.handle(breach(pid=4243, loginuid=authority.UNSET_ID, sessionid=authority.UNSET_ID))
    assert "actor uid 1000 is unprivileged" in notes(store, inc.id)


def test_unprivileged_actor_without_a_pid_is_reported_and_escalated_only(make):
    r, store, enf = make()
    inc = r.handle(breach(pid=None))
    assert enf.actions == [] and store.mitigations() == []
    assert inc.state is IncidentState.ESCALATED
    assert "reported only" in notes(store, inc.id)


def test_a_repeated_finding_keeps_the_one_kill_which_is_never_renewed(make, tmp_path):
    r, store, enf = make()
    r.handle(breach())
    r.handle(breach())
    (m,) = store.mitigations()
    assert len(enf.actions) == 1
    assert m.expires_at == BASE_S + 2.0 + policy.KILL_RECORD_S


def test_a_pid_is_judged_afresh_once_the_kill_record_lapsed(tmp_path):
    clock = [BASE_S]
    cfg = Config(state_dir=str(tmp_path))
    with Store(tmp_path / "agent.db") as store:
        enf = DryRunEnforcer()
        r = Responder(cfg, store, enf, clock=lambda: clock[0], rules=[],
                      to_wall=lambda ns: BASE_S)
        r.handle(breach())
        clock[0] += policy.KILL_RECORD_S / 2 + 1
        r.handle(breach())                      # queued repeat: no renewal, no second kill
        assert store.mitigations()[0].expires_at == BASE_S + policy.KILL_RECORD_S
        clock[0] = BASE_S + policy.KILL_RECORD_S + 1
        r.expire()
        r.handle(breach())                      # a process that reused the pid: killed too
        assert [a[1] for a in enf.actions if a[0] == "apply"] == ["kill_process"] * 2


def test_network_findings_are_not_touched(make):
    r, _, enf = make()
    f = Finding("net.port_scan", 1, EventClass.SYSTEM_ATTACK, Severity.HIGH, "ip:198.51.100.7",
                "block", 1, 2, {"uid": 1000, "euid": 1000, "pid": 5})
    r.handle(f)
    assert enf.actions == [("apply", "block_ip", "198.51.100.7")]


@pytest.mark.parametrize("path, own", [
    ("/", False), ("", False), (None, False), ("/user.slice", False),
    ("/user.slice/user-1000.slice", False), ("/init.scope", False), ("/system.slice", False),
    ("/user.slice/user-1000.slice/session-3.scope", True),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope", True),
    ("/system.slice/nginx.service", True), ("/swa-breach-ab12", True),
    ("/a/../b.scope", False), ("x.scope", False),
])
def test_own_cgroup(path, own):
    assert authority.own_cgroup(path) is own


def _tree(root: Path, owners: dict[str, int]) -> None:
    """A cgroup-like tree under `root`: each path's cgroup.procs owned by its uid."""
    for path, uid in owners.items():
        d = root / path.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").touch()
        os.chown(d / "cgroup.procs", uid, uid)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_delegated_cgroup_is_isolated_at_its_top_the_actor_cannot_move_out_of(tmp_path):
    """systemd delegates user@UID.service to the user (its cgroup.procs is the user's), and
    the user owns what it creates below (`systemd-run --user`): from a frozen
    app.slice/run-1.scope it could move its processes to a sibling. The top of the
    delegation is the target: moving out of it needs the root-owned slice above."""
    user = "/user.slice/user-1000.slice/user@1000.service"
    _tree(tmp_path, {"/user.slice": 0, "/user.slice/user-1000.slice": 0, user: 1000,
                     f"{user}/app.slice": 1000, f"{user}/app.slice/run-1.scope": 1000,
                     SESSION: 0, "/swa": 1000, "/swa/C": 1000})
    assert authority.delegation_root(f"{user}/app.slice/run-1.scope", 1000, tmp_path) == user
    assert authority.delegation_root(SESSION, 1000, tmp_path) == SESSION
    assert authority.delegation_root(f"{user}/app.slice/run-1.scope", 1001, tmp_path) == \
        f"{user}/app.slice/run-1.scope"                        # another uid: not delegated to it
    assert authority.delegation_root("/swa/C", 1000, tmp_path) == "/swa"   # never the root
    assert authority.delegation_root("/absent/x", 1000, tmp_path) == "/absent/x"


def test_a_cgroup_where_another_user_runs_processes_is_not_the_actors(tmp_path):
    """ssh.service on a host without pam_systemd, cron.service, php-fpm pools: one cgroup,
    several users. Root's processes (the daemon) do not make it shared; another uid's do,
    below it too."""
    cg, proc = tmp_path / "cg", tmp_path / "proc"
    procs = {"/system.slice/ssh.service": ["1", "2"], "/system.slice/ssh.service/x": ["3"],
             "/system.slice/web.service": ["1", "2"]}
    uids = {"1": 0, "2": 1000, "3": 1001}
    for path, pids in procs.items():
        d = cg / path.strip("/")
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("\n".join(pids) + "\n")
    for pid, uid in uids.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    assert authority.other_user("/system.slice/ssh.service", 1000, cg, proc) == 1001
    assert authority.other_user("/system.slice/web.service", 1000, cg, proc) is None
    assert authority.other_user("/system.slice/absent", 1000, cg, proc) is None
