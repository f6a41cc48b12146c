"""GPU authorizations: which workloads may use which GPUs (issue 10 item 6), and the verdict
on a process NVML reported on a GPU. Pure (no I/O): the config (`gpu.authorized`), the
store (grants a scheduler made through the control API) and the detector share it.

A grant names a workload and the GPUs it may use:
  workload  a cgroup v2 path ("/kubepods.slice/pod-1", "/system.slice/train.service"):
            that cgroup and every cgroup below it; or "container:<64 hex digits>": the
            container whose cgroup names that id (agent.sources.gpuproc.container_of)
  gpus      "all", GPU uuids ("GPU-8d4b...") or indexes ("0", as NVML numbers them)

The verdict on a `gpu.process` event (GpuPolicy.verdict) adds two fields the rules test:
  authorized  a grant covers the process's cgroup (or container) and that GPU
  system      the process is the host's, never a tenant's, and never acted on: a system
              cgroup (nvidia-persistenced, DCGM, the fabric manager: gpu.system_cgroups),
              the agent's own cgroup, or a system executable (gpu.system_exes) run as
              root in a system service (/system.slice/...) outside any container. The
              executable path alone proves nothing: a container's files are named as the
              container sees them, so a tenant can call its miner /usr/bin/nv-hostengine.
What the tenant controls: its process's comm, argv and (inside its container) its file
names; never its cgroup, uid or pid as the kernel reports them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

ALL = "all"
MAX_GRANTS = 4096             # per source (config, store): a scheduler's jobs on one node
MAX_GPUS_PER_GRANT = 64
MAX_JOB = 128
_CONTAINER_RE = re.compile(r"^container:([0-9a-f]{64})$")
_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]{1,80}$")
_CGROUP_COMPONENT = re.compile(r"^[A-Za-z0-9_.@:+\-]+$")
SYSTEM_CGROUPS = ("/system.slice/nvidia-persistenced.service",
                  "/system.slice/nvidia-dcgm.service", "/system.slice/dcgm.service",
                  "/system.slice/nvidia-fabricmanager.service",
                  "/system.slice/dcgm-exporter.service")
SYSTEM_EXES = ("/usr/bin/nvidia-container-cli", "/usr/bin/nvidia-container-runtime-hook",
               "/usr/bin/nvidia-container-toolkit", "/usr/bin/nvidia-ctk",
               "/usr/bin/nvidia-persistenced", "/usr/sbin/nvidia-persistenced",
               "/usr/bin/nv-hostengine", "/usr/bin/nvidia-smi", "/usr/bin/dcgm-exporter",
               "/usr/bin/nv-fabricmanager", "/usr/bin/nvidia-cuda-mps-server",
               "/usr/bin/nvidia-cuda-mps-control")


class GrantError(ValueError):
    """Invalid grant input; the message is one sentence for the operator."""


@dataclass(frozen=True, order=True)
class Grant:
    """`workload` may use `gpu` ("all", a uuid or an index as text). `source` says where
    it comes from ("config" or "api"), `job` is the scheduler's label for it."""

    workload: str
    gpu: str
    source: str = "config"
    job: str = ""
    created_at: float = 0.0
    by: str = ""

    def covers(self, cgroup: str | None, container_id: str | None, gpu_uuid: Any,
               gpu_index: Any) -> bool:
        if self.workload.startswith("container:"):
            if container_id is None or self.workload != f"container:{container_id}":
                return False
        elif not (isinstance(cgroup, str) and within(cgroup, self.workload)):
            return False
        return self.gpu == ALL or self.gpu == gpu_uuid or (
            self.gpu.isdigit() and isinstance(gpu_index, int) and int(self.gpu) == gpu_index)


_CONTAINER_IN_CGROUP = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")


# Where container runtimes put their containers' cgroups (systemd and cgroupfs drivers of
# Docker/containerd/CRI-O, Kubernetes, rootful podman/libvirt). A cgroup path is a name
# anyone who may create cgroups chooses (a login user's delegated user@UID.service, rootless
# podman, a container with a writable cgroupfs): a container id is believed only under
# these roots, and the first from the root (a nested cgroup named after another container
# inside a real one is still the outer container's).
RUNTIME_ROOTS = ("/system.slice/", "/docker/", "/kubepods.slice/", "/kubepods/",
                 "/machine.slice/")


def container_of(cgroup: Any) -> str | None:
    """The container id a runtime's cgroup path names (docker-<id>.scope, /docker/<id>,
    cri-containerd-<id>, crio-<id>, libpod-<id>), None elsewhere."""
    if not isinstance(cgroup, str) or not cgroup.startswith(RUNTIME_ROOTS):
        return None
    for part in cgroup.split("/"):
        m = _CONTAINER_IN_CGROUP.search(part)
        if m:
            return m.group(1)
    return None


def within(path: str, prefix: str) -> bool:
    """Whether cgroup `path` is `prefix` or below it (whole components only:
    /a/job-1 is not within /a/job)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def parse_workload(text: Any) -> str:
    """A workload as stored: "/a/b" (normalised) or "container:<id>"; GrantError if bad."""
    if not isinstance(text, str) or not text.strip():
        raise GrantError("a workload is a cgroup path ('/kubepods.slice/pod-1') or "
                         "container:<64 hex digits>")
    text = text.strip()
    if text.startswith("container:"):
        if not _CONTAINER_RE.match(text.lower()):
            raise GrantError(f"{text[:80]!r} is not container:<the full 64-hex-digit id>")
        return text.lower()
    if not text.startswith("/"):
        raise GrantError(f"{text[:80]!r} is not a workload: a cgroup path starts with '/', "
                         "a container is container:<64 hex digits>")
    parts = [p for p in text.split("/") if p]
    if not parts:
        raise GrantError("the root cgroup '/' holds every process: authorize a workload's "
                         "own cgroup, never '/'")
    for p in parts:
        if p in (".", "..") or not _CGROUP_COMPONENT.match(p):
            raise GrantError(f"{text[:80]!r} is not a cgroup path (component {p[:40]!r})")
    return "/" + "/".join(parts)


def parse_gpu(value: Any) -> str:
    """"all", a uuid or an index (0..63) as text; GrantError if bad."""
    if isinstance(value, bool):
        raise GrantError(f"{value!r} is not a GPU: use all, a uuid or an index")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise GrantError("a GPU is all, a uuid (GPU-...) or an index (0, 1, ...)")
    value = value.strip()
    if value.lower() == ALL:
        return ALL
    if value.isdigit() and len(value) <= 3 and int(value) < MAX_GPUS_PER_GRANT:
        return str(int(value))
    if _UUID_RE.match(value):
        return value
    raise GrantError(f"{value[:80]!r} is not a GPU: use all, a uuid (GPU-...) or an "
                     f"index (0..{MAX_GPUS_PER_GRANT - 1})")


def parse_gpus(values: Any) -> tuple[str, ...]:
    """One GPU or a list of them; "all" alone, never mixed; GrantError if bad."""
    items = values if isinstance(values, (list, tuple)) else [values]
    if not items:
        raise GrantError("name at least one GPU (or all)")
    if len(items) > MAX_GPUS_PER_GRANT:
        raise GrantError(f"at most {MAX_GPUS_PER_GRANT} GPUs in one grant")
    gpus = tuple(dict.fromkeys(parse_gpu(v) for v in items))
    if ALL in gpus and len(gpus) > 1:
        raise GrantError("'all' already names every GPU: give it alone")
    return gpus


def parse_job(text: Any) -> str:
    if text is None:
        return ""
    if not isinstance(text, str) or len(text) > MAX_JOB or \
            any(not (c.isprintable()) for c in text):
        raise GrantError(f"a job label is printable text of at most {MAX_JOB} characters")
    return text


def parse_config(key: str, value: Any) -> tuple[Grant, ...]:
    """`gpu.authorized` from the config: a list of {workload, gpus, job}; ValueError
    naming the entry."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list of {{workload: ..., gpus: ...}}")
    if len(value) > MAX_GRANTS:
        raise ValueError(f"{key}: at most {MAX_GRANTS} entries")
    out: list[Grant] = []
    for n, item in enumerate(value, 1):
        try:
            if not isinstance(item, dict) or set(item) - {"workload", "gpus", "job"} or \
                    "workload" not in item:
                raise GrantError("each entry is a mapping of workload, gpus (default all) "
                                 "and an optional job label")
            workload = parse_workload(item["workload"])
            job = parse_job(item.get("job"))
            out += [Grant(workload, g, "config", job)
                    for g in parse_gpus(item.get("gpus", ALL))]
        except GrantError as e:
            raise ValueError(f"{key} #{n}: {e}") from None
    return tuple(dict.fromkeys(out))


def parse_system_cgroups(key: str, values: Iterable[str]) -> tuple[str, ...]:
    try:
        return tuple(parse_workload(v) for v in values if not v.startswith("container:"))
    except GrantError as e:
        raise ValueError(f"{key}: {e}") from None


@dataclass(frozen=True)
class GpuPolicy:
    """What the detector judges gpu.process events by: the grants in force (config and
    store together), the system cgroups and executables, and the agent's own cgroup
    (exact: an agent in the root cgroup must not exempt every process)."""

    grants: tuple[Grant, ...] = ()
    system_cgroups: tuple[str, ...] = SYSTEM_CGROUPS
    system_exes: tuple[str, ...] = SYSTEM_EXES
    agent_cgroup: str | None = None
    version: int = 0
    # Whether GPU authorization is in use on this node: the config grants some workload,
    # or a scheduler has authorized one (ever: agent.state.gpugrants.enrolled_at). What
    # gpu.on_violation auto turns into kill; before it, report.
    enrolled: bool = False

    def verdict(self, f: Mapping[str, Any], kind: str = "gpu.process") -> dict[str, Any]:
        """{"authorized": bool, "system": bool, "container_id"} for a gpu.process event's
        fields (a record whose pid could not be pinned, resolved false, gets nothing:
        rules never act on it), or a gpu.open's (the kernel's, at the open of a
        /dev/nvidia* device: authorized when the workload holds a grant for any GPU --
        the device's minor number is not NVML's index, so which GPU is judged at NVML's
        sample)."""
        if kind == "gpu.process" and f.get("resolved") is not True:
            return {}
        cgroup = f.get("cgroup")
        container = container_of(cgroup)     # never the event's own reading: anchored here
        if kind == "gpu.open":
            authorized = any(g.covers(cgroup, container, g.gpu, int(g.gpu) if
                                      g.gpu.isdigit() else None) for g in self.grants)
        else:
            authorized = any(g.covers(cgroup, container, f.get("gpu_uuid"),
                                      f.get("gpu_index")) for g in self.grants)
        return {"authorized": authorized, "system": self.is_system(
            {**f, "container_id": container}), "container_id": container}

    def is_system(self, f: Mapping[str, Any]) -> bool:
        cgroup = f.get("cgroup")
        if not isinstance(cgroup, str):
            return False
        if self.agent_cgroup is not None and cgroup == self.agent_cgroup:
            return True
        if any(within(cgroup, c) for c in self.system_cgroups):
            return True
        # Root's own GPU tools: in a system unit, or in root's login session (an admin's
        # nvidia-smi over SSH), never in a container.
        return (f.get("exe") in self.system_exes and f.get("uid") == 0
                and f.get("container_id") is None
                and cgroup.startswith(("/system.slice/", "/user.slice/user-0.slice/")))

    def listing(self) -> list[dict[str, Any]]:
        return [{"workload": g.workload, "gpu": g.gpu, "source": g.source, "job": g.job,
                 "created_at": g.created_at, "by": g.by} for g in sorted(self.grants)]
