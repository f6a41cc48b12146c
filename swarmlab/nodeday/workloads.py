"""The node's tenants: a web service (clients through the load balancers, many short
connections to its database and cache, calls to SaaS APIs on rotating CDN addresses,
now and then a database failover or a redeploy in a new container) and GPU training
jobs (each in a NEW container: image pull, torchrun and 8 ranks, NCCL listeners on
ephemeral ports, data reads and checkpoint uploads every ~30 min to object storage on
rotating addresses, experiment tracking, sometimes a crash and restart or a new image)."""
from __future__ import annotations

from dataclasses import dataclass, field

from swarmlab.nodeday.kernel import Cgroup, Proc
from swarmlab.nodeday.node import (CACHE, DAY_S, DB, LBS, NCCL_PEERS, NFS, REGISTRY_CDN, S3,
                                   SAAS, WANDB, Node, diurnal, poisson_times, pool)

PY = "/usr/local/bin/python3.11"


class Web:
    def __init__(self, node: Node, days: int):
        self.node, self.rng = node, node.rng("web")
        self.image, self.version = "web", 1
        self.cg = self._deploy(0.5, out := [])
        self.boot = out
        self.redeploys = {d: d * DAY_S + self.rng.uniform(9, 17) * 3600
                          for d in range(days) if self.rng.random() < 0.2}
        self.failovers = {d: d * DAY_S + self.rng.uniform(0, DAY_S)
                          for d in range(days) if self.rng.random() < 0.15}
        self.history: list[tuple[float, Cgroup]] = [(0.0, self.cg)]

    def _deploy(self, t: float, out: list) -> Cgroup:
        cg = self.node.container("web", self.rng)
        cg.image = f"{self.image}:{self.version}"        # type: ignore[attr-defined]
        for path in ("/bin/sh", PY, PY):
            t += self.rng.uniform(0.01, 0.3)
            out.append(self.node.exec(t, self.node.proc(cg, self.exe(cg, path), 1000)))
        self.master = self.node.proc(cg, self.exe(cg, PY), 1000, "gunicorn")
        out.append(self.node.act(t + 1.0, "listen", self.master, 8000, "0.0.0.0"))
        self.workers = [self.node.proc(cg, self.exe(cg, PY), 1000, "gunicorn") for _ in range(4)]
        return cg

    def exe(self, cg: Cgroup, path: str):
        return self.node.image_exe(cg, cg.image, path)    # type: ignore[attr-defined]

    def at(self, t: float) -> Cgroup:
        """The web container running at time t."""
        return [cg for since, cg in self.history if since <= t][-1]

    def hour(self, t0: float, t1: float) -> list:
        out, self.boot = self.boot, []
        day = int(t0 // DAY_S)
        served = [(self.cg, t0, t1)]       # which container the load balancers reach, when
        switch, before = t1, self.workers  # the old container's workers serve until switch
        if t0 <= self.redeploys.get(day, -1) < t1:
            t = self.redeploys[day]
            if self.rng.random() < 0.5:
                self.version += 1          # a new image: its python is a new file too
            old, switch = self.cg, t
            self.cg = self._deploy(t, out)
            self.history.append((t, self.cg))
            # the new container has no traffic before it starts (a stream from the hour's
            # start made it "first seen" before its own start: no image grace)
            served = [(old, t0, t), (self.cg, t + 2.0, t1)]
        workers = lambda t: before if t < switch else self.workers   # noqa: E731
        fail = self.failovers.get(day, -1)
        load = lambda t: diurnal(t)   # noqa: E731
        for daddr, dport, base, peak in ((DB, 5432, 0.3, 2.0), (CACHE, 6379, 0.2, 1.0)):
            for t in poisson_times(self.rng, t0, t1, lambda t: base + peak * load(t)):
                w = self.rng.choice(workers(t))
                refused = fail <= t < fail + 30 and daddr == DB
                self.node.connection(out, self.rng, t, w, daddr, dport,
                                     self.rng.expovariate(1 / 0.05), self.rng.randint(300, 3000),
                                     self.rng.randint(500, 60_000),
                                     "refused" if refused else "established", rtt_s=0.0003)
        rate = 20_000 + 800_000 * load(t0 + 1800)
        for cg, s0, s1 in served:
            for i, lb in enumerate(LBS):
                out.append(self.node.act(s0, "stream", cg, lb,
                                         40000 + (int(t0 // 3600) * 7 + i) % 20000,
                                         "tcp", rate / 3, rate / 3 / 8000, s1))
        for t in poisson_times(self.rng, t0, t1, lambda t: 0.004 + 0.02 * load(t)):
            self.node.connection(out, self.rng, t, self.rng.choice(workers(t)), pool(SAAS, self.rng),
                                 443, self.rng.uniform(0.1, 1.5), self.rng.randint(2000, 9000),
                                 self.rng.randint(1000, 20_000), rtt_s=0.015)
        return out


@dataclass(eq=False)
class Job:
    start: float
    end: float
    image: str
    peers: tuple[str, ...]
    crash_at: float | None
    cg: Cgroup | None = None
    ranks: list[Proc] = field(default_factory=list)


class Training:
    """GPU training jobs one after another, each in a new guaranteed-QoS container."""

    def __init__(self, node: Node, days: int):
        self.node, self.rng = node, node.rng("training")
        self.jobs: list[Job] = []
        t, image = self.rng.uniform(300, 1800), 1
        while t < days * DAY_S:
            dur = self.rng.uniform(2, 10) * 3600
            if self.rng.random() < 0.3:
                image += 1
            crash = t + self.rng.uniform(0.2, 0.8) * dur if self.rng.random() < 0.3 else None
            peers = tuple(self.rng.sample(NCCL_PEERS, 2)) if self.rng.random() < 0.5 else ()
            job = Job(t, t + dur, f"trainer:{image}", peers, crash)
            job.cg = node.container("training", self.rng, "guaranteed")
            job.cg.image = job.image                       # type: ignore[attr-defined]
            self.jobs.append(job)
            t += dur + self.rng.uniform(300, 3600)
        self.python = {j: node.proc(j.cg, self.exe(j, PY), 1000, "python3") for j in self.jobs}

    def exe(self, job: Job, path: str):
        # a new trainer image is a new python build half the time (CUDA/torch base bump)
        image = job.image if int(job.image.split(":")[1]) % 2 == 0 else "trainer:base"
        return self.node.image_exe(job.cg, image, path)

    def at(self, t: float) -> Job | None:
        return next((j for j in self.jobs if j.start <= t < j.end), None)

    def _start_ranks(self, out: list, job: Job, t: float) -> float:
        node, rng = self.node, self.rng
        launcher = node.proc(job.cg, self.exe(job, PY), 1000, "torchrun")
        out.append(node.exec(t, launcher))
        out.append(node.act(t + 0.5, "listen", launcher, 29500, "0.0.0.0"))
        job.ranks = [node.proc(job.cg, self.exe(job, PY), 1000, "python3") for _ in range(8)]
        for i, r in enumerate(job.ranks):
            out.append(node.exec(t + 1 + i * 0.05, r))
            out.append(node.act(t + 4 + i * 0.1, "listen", r, rng.randrange(32768, 61000), "0.0.0.0"))
            out.append(node.act(t + 20 + i * 0.2, "gpu_proc", r, i, rng.randint(60, 76) * 2**30))
        out.append(node.act(t + 20, "gpu_set", job.cg, 8 * rng.uniform(88, 99), 8 * 70 * 2**30, True))
        for p in job.peers:
            c = node.connection(out, rng, t + 5, job.ranks[0], p, rng.randrange(32768, 61000),
                                job.end - t - 5, 0, 0, rtt_s=0.0002)
            c.streamed = True
        return t + 20

    def _begin(self, out: list, job: Job) -> None:
        node, rng, t = self.node, self.rng, job.start
        if job is self.jobs[0] or job.image != self.jobs[self.jobs.index(job) - 1].image:
            ctrd = node.proc(node.cgroup("/system.slice/containerd.service"),
                             node.host_exe("/usr/bin/containerd"))
            for _ in range(rng.randint(2, 4)):
                node.connection(out, rng, t, ctrd, pool(REGISTRY_CDN, rng), 443,
                                rng.uniform(20, 90), 50_000, rng.randint(500, 4000) * 1_000_000,
                                rtt_s=0.01)
            t += 95
        for p in ("/usr/bin/containerd-shim-runc-v2", "/usr/sbin/runc"):
            t += 0.2
            out.append(node.exec(t, node.proc(node.cgroup("/system.slice/containerd.service"),
                                              node.host_exe(p))))
        out.append(node.exec(t + 0.3, node.proc(job.cg, self.exe(job, "/bin/sh"), 1000)))
        t = self._start_ranks(out, job, t + 1)
        nfs = node.connection(out, rng, t, job.ranks[0], NFS, 2049, job.end - t, 0, 0, rtt_s=0.0002)
        nfs.streamed = True
        out.append(node.act(t, "stream", job.cg, NFS, 2049, "tcp", 60_000.0, 40.0, job.end))
        job.next_ckpt = t + 1800 + rng.uniform(-60, 60)            # type: ignore[attr-defined]
        job.next_read = t + rng.expovariate(1 / 30)                # type: ignore[attr-defined]
        job.next_wandb = t + 1                                     # type: ignore[attr-defined]

    def _run(self, out: list, job: Job, t0: float, t1: float) -> None:
        node, rng = self.node, self.rng
        py = self.python[job]
        while job.next_read < min(t1, job.end):
            node.connection(out, rng, job.next_read, rng.choice(job.ranks), pool(S3, rng), 443,
                            rng.uniform(2, 10), rng.randint(2000, 6000),
                            rng.randint(50, 200) * 1_000_000, rtt_s=0.008)
            job.next_read += rng.expovariate(1 / 30)
        while job.next_wandb < min(t1, job.end):
            life = rng.uniform(600, 2400)
            c = node.connection(out, rng, job.next_wandb, py, WANDB, 443, life, 0, 0, rtt_s=0.02)
            c.streamed = True
            out.append(node.act(job.next_wandb, "stream", job.cg, WANDB, 443, "tcp", 2000.0, 0.5,
                                job.next_wandb + life))
            job.next_wandb += life + rng.uniform(0.5, 5)
        while job.next_ckpt < min(t1, job.end):
            size = rng.randint(8, 40) * 2**30
            for i in range(8):
                node.upload(out, rng, job.next_ckpt + i * 0.01, job.ranks[0], pool(S3, rng), 443,
                            size // 8, rng.uniform(15, 60))
            job.next_ckpt += 1800 + rng.uniform(-120, 120)
        if job.crash_at is not None and t0 <= job.crash_at < t1:
            out.append(node.act(job.crash_at, "gpu_set", job.cg, 0.0, 0, True))
            self._start_ranks(out, job, job.crash_at + rng.uniform(30, 90))

    def hour(self, t0: float, t1: float) -> list:
        out: list = []
        for job in self.jobs:
            if job.end < t0 or job.start >= t1:
                continue
            if t0 <= job.start < t1:
                self._begin(out, job)
            self._run(out, job, max(t0, job.start), t1)
            if t0 <= job.end < t1:
                out.append(self.node.act(job.end, "gpu_set", job.cg, 0.0, 0, True))
        return out
