"""The node's own services: kubelet (API server stream, liveness probes: a benign
10 s beacon), the agent's mesh channel, the metrics exporter (scraped every 15 s) and
remote write (every 30 s), NTP (UDP, rotating pool servers), DNS, cron (every 10 min,
hourly, daily bursts), apt (twice-daily update, daily upgrade that replaces binaries on
disk: new file ids and hashes), and an operator's ssh sessions now and then.

Each activity's hour(t0, t1) returns its actions in [t0, t1) (a close may fall later)."""
from __future__ import annotations

from swarmlab.nodeday.node import (API_SERVER, DAY_S, DEBIAN_CDN, GITHUB, HEALTHCHECK, MESH,
                                   NTP_POOL, PROMETHEUS, REMOTE_WRITE, RESOLVER, Node,
                                   diurnal, pool)


class Persistent:
    """A long-lived connection sending at `rate` bytes/s, reconnected every
    reconnect_s (a uniform range): gRPC channels, the API server watch, remote write."""

    def __init__(self, node: Node, name: str, cgroup: str, exe: str, daddr: str, dport: int,
                 rate: float, reconnect_s: tuple[float, float], sends_per_s: float = 1.0):
        self.node, self.rng = node, node.rng(name)
        self.cg = node.cgroup(cgroup)
        self.proc = node.proc(self.cg, node.host_exe(exe))
        self.daddr, self.dport, self.rate, self.sps = daddr, dport, rate, sends_per_s
        self.reconnect_s = reconnect_s
        self.next_t = self.rng.uniform(0, 5)

    def hour(self, t0: float, t1: float) -> list:
        out: list = []
        while self.next_t < t1:
            t = self.next_t
            life = self.rng.uniform(*self.reconnect_s)
            c = self.node.connection(out, self.rng, t, self.proc, self.daddr, self.dport,
                                     life, int(self.rate * life), int(self.rate * life / 4))
            c.streamed = True
            out.append(self.node.act(t + 0.001, "stream", self.cg, self.daddr, self.dport, "tcp",
                                     self.rate, self.sps, t + life))
            self.next_t = t + life + self.rng.uniform(0.05, 2.0)
        return out


class Periodic:
    """Bytes sent every `period_s` (+- jitter_s) on a kept-alive connection: a scrape
    answered, a remote-write push."""

    def __init__(self, node: Node, name: str, cgroup: str, daddr: str, dport: int,
                 period_s: float, jitter_s: float, size: tuple[int, int]):
        self.node, self.rng = node, node.rng(name)
        self.cg = node.cgroup(cgroup)
        self.daddr, self.dport, self.period_s, self.jitter_s, self.size = \
            daddr, dport, period_s, jitter_s, size
        self.next_t = self.rng.uniform(0, period_s)

    def hour(self, t0: float, t1: float) -> list:
        out = []
        while self.next_t < t1:
            n = self.rng.randint(*self.size)
            out.append(self.node.act(self.next_t, "send", self.cg, self.daddr, self.dport, "tcp",
                                     n, max(1, n // 16384)))
            self.next_t += self.period_s + self.rng.uniform(-self.jitter_s, self.jitter_s)
        return out


class Liveness:
    """kubelet's HTTP liveness probe of the web pod: a new TCP connection every 10 s."""

    def __init__(self, node: Node, web):
        self.node, self.rng, self.web = node, node.rng("liveness"), web
        self.proc = node.proc(node.cgroup("/system.slice/kubelet.service"),
                              node.host_exe("/usr/bin/kubelet"))
        self.next_t = 10.0

    def hour(self, t0: float, t1: float) -> list:
        out: list = []
        while self.next_t < t1:
            self.node.connection(out, self.rng, self.next_t, self.proc, self.web.cg.addr, 8000,
                                 self.rng.uniform(0.001, 0.004), 110, 180, rtt_s=0.0001)
            self.next_t += 10.0 + self.rng.uniform(-0.02, 0.02)
        return out


class Ntp:
    """systemd-timesyncd: 48-byte UDP requests to one pool server, the poll interval
    growing 32 s -> 2048 s; the pool's DNS answer changes every few hours."""

    def __init__(self, node: Node):
        self.node, self.rng = node, node.rng("ntp")
        self.cg = node.cgroup("/system.slice/systemd-timesyncd.service")
        self.server, self.interval, self.next_t = pool(NTP_POOL, self.rng), 32.0, 1.0
        self.rotate_t = self.rng.uniform(3600, 6 * 3600)

    def hour(self, t0: float, t1: float) -> list:
        out = []
        while self.next_t < t1:
            if self.next_t >= self.rotate_t:
                self.server, self.interval = pool(NTP_POOL, self.rng), 32.0
                self.rotate_t += self.rng.uniform(3600, 6 * 3600)
            out.append(self.node.act(self.next_t, "send", self.cg, self.server, 123, "udp", 48, 1))
            self.interval = min(2048.0, self.interval * 2)
            self.next_t += self.interval
        return out


class Dns:
    """systemd-resolved forwarding the node's lookups (more by day) to the resolver."""

    def __init__(self, node: Node):
        self.node = node
        self.cg = node.cgroup("/system.slice/systemd-resolved.service")

    def hour(self, t0: float, t1: float) -> list:
        qps = 1.0 + 9.0 * diurnal(t0 + 1800)
        return [self.node.act(t0, "stream", self.cg, RESOLVER, 53, "udp", qps * 70, qps, t1)]


class Cron:
    """cron.service: sysstat every 10 min, cron.hourly at :17 (with a health-check ping),
    cron.daily at 06:25 (logrotate, find, gzip, man-db, dpkg backup)."""

    HOURLY = ("/bin/sh", "/bin/run-parts", "/usr/bin/curl")
    DAILY = ("/bin/sh", "/bin/run-parts", "/usr/sbin/logrotate", "/bin/gzip", "/usr/bin/find",
             "/usr/bin/mandb", "/usr/bin/dpkg", "/usr/bin/cmp", "/bin/sh", "/usr/bin/find")

    def __init__(self, node: Node):
        self.node, self.rng = node, node.rng("cron")
        self.cg = node.cgroup("/system.slice/cron.service")

    def _run(self, t: float, paths) -> list:
        out = []
        for p in paths:
            t += self.rng.uniform(0.002, 0.2)
            out.append(self.node.exec(t, self.node.proc(self.cg, self.node.host_exe(p, t))))
        return out

    def hour(self, t0: float, t1: float) -> list:
        out: list = []
        for m in range(0, 60, 10):
            out += self._run(t0 + m * 60 + 1, ("/bin/sh", "/usr/lib/sysstat/debian-sa1",
                                               "/usr/lib/sysstat/sadc"))
        t = t0 + 17 * 60 + 1
        out += self._run(t, self.HOURLY)
        curl = self.node.proc(self.cg, self.node.host_exe("/usr/bin/curl", t + 0.5))
        self.node.connection(out, self.rng, t + 0.5, curl, HEALTHCHECK, 443,
                             self.rng.uniform(0.1, 0.4), 900, 4200, rtt_s=0.02)
        if int((t0 % DAY_S) // 3600) == 6:
            gz = self.rng.randint(4, 12)
            out += self._run(t0 + 25 * 60, self.DAILY + ("/bin/gzip",) * gz)
        return out


class Apt:
    """apt-daily (06:00 and 18:00, RandomizedDelaySec=12h) and apt-daily-upgrade (06:00 +
    up to 1 h): methods fetch from the Debian CDN; an upgrade replaces binaries on disk."""

    UPDATE = ("/bin/sh", "/usr/bin/apt-config", "/usr/bin/apt-config", "/usr/bin/apt-get",
              "/usr/lib/apt/methods/http", "/usr/lib/apt/methods/http", "/usr/bin/gpgv",
              "/usr/bin/gpgv", "/usr/lib/apt/methods/store", "/usr/lib/apt/methods/rred")
    UPGRADABLE = ("/usr/bin/find", "/bin/gzip", "/usr/bin/curl", "/bin/sh", "/usr/sbin/logrotate",
                  "/usr/bin/cmp", "/usr/lib/sysstat/sadc")

    def __init__(self, node: Node):
        self.node, self.rng = node, node.rng("apt")
        self.update_cg = node.cgroup("/system.slice/apt-daily.service")
        self.upgrade_cg = node.cgroup("/system.slice/apt-daily-upgrade.service")
        self.plan: list[tuple[float, str]] = []

    def _fetch(self, out: list, t: float, cg, n: int, big: bool) -> float:
        http = self.node.proc(cg, self.node.host_exe("/usr/lib/apt/methods/http", t))
        for _ in range(n):
            dur = self.rng.uniform(1, 20)
            self.node.connection(out, self.rng, t, http, pool(DEBIAN_CDN, self.rng), 80, dur,
                                 self.rng.randint(800, 4000),
                                 self.rng.randint(5, 100 if big else 40) * 1_000_000, rtt_s=0.01)
            t += dur + self.rng.uniform(0.1, 2)
        return t

    def hour(self, t0: float, t1: float) -> list:
        if int(t0 % DAY_S) == 0:
            day = t0
            self.plan += [(day + 6 * 3600 + self.rng.uniform(0, 12 * 3600), "update"),
                          (day + 18 * 3600 + self.rng.uniform(0, 6 * 3600), "update"),
                          (day + 6 * 3600 + self.rng.uniform(0, 3600), "upgrade")]
        out: list = []
        for when, what in [p for p in self.plan if t0 <= p[0] < t1]:
            cg = self.update_cg if what == "update" else self.upgrade_cg
            paths = self.UPDATE if what == "update" else (
                "/bin/sh", "/usr/bin/apt-config", "/usr/bin/python3.11", "/usr/bin/apt-config")
            t = when
            for p in paths:
                t += self.rng.uniform(0.01, 0.5)
                out.append(self.node.exec(t, self.node.proc(cg, self.node.host_exe(p, t))))
            t = self._fetch(out, t, cg, self.rng.randint(2, 4), False)
            if what == "upgrade" and self.rng.random() < 0.35:
                t = self._fetch(out, t, cg, self.rng.randint(1, 3), True)
                for p in ("/usr/bin/dpkg",) * self.rng.randint(3, 9) + ("/usr/bin/dpkg-deb",):
                    t += self.rng.uniform(0.05, 2)
                    out.append(self.node.exec(t, self.node.proc(cg, self.node.host_exe(p, t))))
                for p in self.rng.sample(self.UPGRADABLE, self.rng.randint(1, 2)):
                    self.node.upgrade(p, t)
        self.plan = [p for p in self.plan if p[0] >= t1]
        return out


class Ssh:
    """An operator's ssh sessions (about 1.5 a working day): a new session scope each time,
    a shell and admin commands; sometimes a git clone, sometimes a new tool installed."""

    COMMANDS = ("/usr/bin/sudo", "/bin/ls", "/bin/cat", "/bin/grep", "/usr/bin/journalctl",
                "/bin/systemctl", "/usr/bin/nvidia-smi", "/usr/bin/htop", "/usr/bin/vim.basic",
                "/bin/df", "/usr/bin/du", "/bin/ps", "/usr/bin/tail", "/usr/bin/less",
                "/usr/bin/crictl", "/bin/ip", "/bin/ss", "/usr/bin/top")
    NEW_TOOLS = ("/usr/bin/iotop", "/usr/bin/strace", "/usr/bin/tcpdump", "/usr/bin/ncdu",
                 "/usr/bin/jq", "/usr/bin/nvtop")

    def __init__(self, node: Node):
        self.node, self.rng = node, node.rng("ssh")
        self.session = 0

    def hour(self, t0: float, t1: float) -> list:
        hour_of_day = (t0 % DAY_S) / 3600
        if not (8 <= hour_of_day < 19) or self.rng.random() > 1.5 / 11:
            return []
        self.session += 1
        cg = self.node.cgroup(f"/user.slice/user-1000.slice/session-{self.session}.scope")
        t = t0 + self.rng.uniform(0, 3000)
        out = [self.node.exec(t, self.node.proc(cg, self.node.host_exe("/bin/bash", t), 1000))]
        tools = list(self.COMMANDS)
        if self.rng.random() < 0.1:
            tools.append(self.rng.choice(self.NEW_TOOLS))
            for p in ("/usr/bin/sudo", "/usr/bin/apt", "/usr/lib/apt/methods/http", "/usr/bin/dpkg"):
                t += self.rng.uniform(0.5, 3)
                out.append(self.node.exec(t, self.node.proc(cg, self.node.host_exe(p, t))))
        for _ in range(self.rng.randint(15, 60)):
            t += self.rng.expovariate(1 / 30)
            out.append(self.node.exec(t, self.node.proc(
                cg, self.node.host_exe(self.rng.choice(tools), t), 1000)))
        if self.rng.random() < 0.2:
            git = self.node.proc(cg, self.node.host_exe("/usr/bin/git", t), 1000)
            out.append(self.node.exec(t, git))
            self.node.connection(out, self.rng, t + 0.1, git, pool(GITHUB, self.rng), 443,
                                 self.rng.uniform(1, 8), 20_000, 30_000_000, rtt_s=0.03)
        return out


def system(node: Node, web) -> list:
    """The node's services, in a fixed order (the seed fixes each one's randomness)."""
    return [Persistent(node, "kubelet", "/system.slice/kubelet.service", "/usr/bin/kubelet",
                       API_SERVER, 6443, 3000.0, (1800, 6 * 3600), 4.0),
            Persistent(node, "mesh", "/system.slice/swarm-agent.service", "/usr/bin/python3.11",
                       MESH, 7443, 150.0, (4 * 3600, 12 * 3600), 0.1),
            Persistent(node, "remote-write", "/system.slice/vmagent.service", "/usr/bin/vmagent",
                       REMOTE_WRITE, 8428, 10.0, (3600, 3 * 3600), 0.1),
            Periodic(node, "remote-write-push", "/system.slice/vmagent.service", REMOTE_WRITE,
                     8428, 30.0, 0.3, (50_000, 200_000)),
            Periodic(node, "scrape", "/system.slice/prometheus-node-exporter.service",
                     PROMETHEUS, 43122, 15.0, 0.05, (40_000, 80_000)),
            # Apt first: an upgrade is on record before the same hour's runs look a file up
            Liveness(node, web), Ntp(node), Dns(node), Apt(node), Cron(node), Ssh(node)]
