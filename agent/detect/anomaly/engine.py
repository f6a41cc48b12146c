"""The anomaly engine: windows per entity -> features -> streaming detectors -> calibrated
tail probabilities -> persistence and dedup -> findings. Pure: no I/O, no clock of its
own (events' mono_ns and tick's argument drive everything)."""
from __future__ import annotations

import ipaddress
import math
from collections import Counter, deque
from typing import Any

from agent.detect.anomaly import findings as fx
from agent.detect.anomaly import slow, teach
from agent.detect.anomaly.beacon import BeaconTracker, beacon_key
from agent.detect.anomaly.calibrate import Calibrator
from agent.detect.anomaly.config import MODELS, AnomalyConfig, rotating_ports
from agent.detect.anomaly.detectors import drivers as drivers_of
from agent.detect.anomaly.features import (INDEX, Either, Novelty, exe_key, prefix,
                                             login_program, profile_of, scale,
                                             system_program)
from agent.detect.anomaly.replaced import Replacements
from agent.detect.anomaly.profile import PROFILE_MIN, Profile, Workload
from agent.model import Event, Finding, Severity

MODEL_VERSION = 1
USED = frozenset(("flow.connect", "flow.close", "flow.listen", "flow.bytes", "activity.exec_new",
                  "activity.counts", "proc.exec", "gpu.process", "gpu.usage"))
NEAR_P = 0.01         # windows this unusual teach the models nothing
DEDUP_NEWS = 64      # new things remembered per deduplicated kind of finding
HIGH_FACTOR = 100.0   # a tail probability this much under the budget: severity high
SHADOW_KEEP = 20
PORTS_KNOWN_MAX = 3   # a reported window's new service ports that become known (else news)
REPORTED_PER_FINDING = 16   # destinations and listeners one finding keeps as news
IMAGE_DIRS = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/", "/app/", "/srv/",
              "/workspace/")   # where images keep programs (not /tmp, /dev/shm, volumes)
NOVEL = [INDEX[n] for n in ("new_exes", "new_exes_here", "new_dsts", "new_ports",
                            "new_dst_bytes", "new_listens", "gpu_unauth_bytes")]
# A listener is one window's event: persistence (k flagged windows of m) cannot apply to
# it, so a flagged window holding a never-seen listener counts on its own. (Alone it
# scores about 10 sigma, which sits on the 1e-5 level's calibrated threshold: the window
# after it holds nothing, and a bind shell was then found only by its shell's execs.)
LISTEN = INDEX["new_listens"]


class AnomalyEngine:
    """observe(event) -> tick(now) -> findings; snapshot()/restore() for persistence;
    learn(evidence) for "learn as normal" feedback; status(); recent(workload)."""

    def __init__(self, cfg: AnomalyConfig, node: str, known: tuple[str, ...] = ()):
        self.cfg, self.node_name = cfg, node
        # Cgroups not modelled (the daemon adds its own); "/" would be every one: skipped.
        self.ignore_cgroups = tuple(p.rstrip("/") for p in cfg.ignore_cgroups if p.rstrip("/"))
        self.dets = tuple(cfg.detectors)
        self.models = tuple(d for d in self.dets if d in MODELS)
        self.beacons_on = "beacon" in self.dets
        self.version = MODEL_VERSION
        nets = [ipaddress.ip_network(n, strict=False) for n in (*cfg.known_destinations, *known)]
        self.known_nets = nets
        self.window_ns = int(cfg.window_s * 1e9)
        k, m = cfg.persistence_k, max(cfg.persistence_k, cfg.persistence_m)
        self.persist_m = m
        # Per-window level so that k flagged windows of m cost the budget (independent
        # windows): C(m, k) * p^k = false_alarm_rate.
        self.p_window = (cfg.false_alarm_rate / math.comb(m, k)) ** (1.0 / k)
        self.profiles: dict[str, Profile] = {}
        self.workloads: dict[str, Workload] = {}
        self.node = self._new_workload("node", "", "", "node")
        self.cal: dict[str, Calibrator] = {}
        self.beacon = BeaconTracker(cfg, nets)
        self.counters: Counter[str] = Counter()
        self.shadow: deque[dict[str, Any]] = deque(maxlen=SHADOW_KEEP)
        self.exe_paths: dict[str, str] = {}
        self.replaced = Replacements(cfg.novelty_max)   # executables a package replaced
        self.taught = teach.Taught()    # what each "learn" feedback changed (for its revert)
        self.reported_news = Novelty(cfg.novelty_max)   # what findings reported: news node-wide
        self.reported_exes = Novelty(cfg.novelty_max)   # programs apart (a flood cannot evict)
        self.pods = Novelty(cfg.novelty_max)    # parent cgroups of containers seen (image grace)
        self.started_ns: int | None = None
        self.up_ns: int | None = None
        self.window_start: int | None = None
        self.now = 0
        self.kernel_bytes = False
        self.unattributed = False
        self._reported = False      # the window being closed produced a finding
        self.restored = "fresh start"
        self._rebase_from: int | None = None    # snapshot time awaiting the first clock

    # -- input --------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        if event.kind not in USED:
            return
        if self._rebase_from is not None:
            self._rebase(event.mono_ns)
        try:
            self._observe(event)
        except (TypeError, ValueError, AttributeError) as e:   # malformed fields: counted
            self.counters["events_malformed"] += 1
            self.counters[f"malformed.{type(e).__name__}"] += 1

    def _observe(self, ev: Event) -> None:
        f, kind = ev.fields, ev.kind
        cgroup = f.get("cgroup") or ""
        cgroup = cgroup if isinstance(cgroup, str) else ""
        if cgroup and any(cgroup == p or cgroup.startswith(p + "/")
                          for p in self.ignore_cgroups):
            return
        if kind == "flow.bytes":
            self.kernel_bytes = True
        execs = kind in ("proc.exec", "activity.exec_new")
        # A package's program run by root in a host system service is no news as a
        # program, unless its path ran before as another file: a changed file there is
        # a replacement only as replaced.py allows (a package manager's new inode).
        system = execs and system_program(f) and self.replaced.unchanged(f)
        login = execs and login_program(f)      # (worked out once for both windows)
        self.node.window.add(kind, f, ev.subject, system, login)
        w = self._workload(f, cgroup, ev.mono_ns)
        if w is None:
            self.unattributed = True      # the node window holds activity of no workload
        target = w or self.node
        if w is not None:
            w.window.add(kind, f, ev.subject, system, login)
        old = self.replaced.exec(f, self.profiles["node"].known, ev.mono_ns) if execs else None
        if old is not None:
            # the new file is known wherever the old one was
            self.counters["replaced_exes"] += 1
            for p in self.profiles.values():
                if old in p.known.exes:
                    p.known.exes.add(exe_key(f))
        if kind in ("proc.exec", "activity.exec_new", "flow.connect"):
            key = exe_key(f)
            if key and f.get("exe") and len(self.exe_paths) < 4 * self.cfg.novelty_max:
                self.exe_paths[key] = str(f.get("exe"))
            target.recent.append(_recent(ev))
        # Beacons: established connections only (a flood of failed connects to ever-new
        # addresses is no check-in and must not crowd the table), gathered per container
        # or systemd unit (beacon_key: rotating sub-cgroups or scopes is one beacon).
        # A rotating service's port (NTP polls) is periodic by design: not scored.
        if kind == "flow.connect" and self.beacons_on and \
                f.get("outcome", "established") == "established" and not (
                    w is not None and int(f.get("dport") or 0) in self._rotating(w)):
            dst, port = str(f.get("daddr") or ev.subject), int(f.get("dport") or 0)
            p = self._profile(target.profile)
            pf = prefix(dst)
            new = pf not in p.known.dsts and pf not in self.profiles["node"].known.dsts
            bkey = self._beacon_key(w, f, cgroup)
            self.beacon.connect(bkey, dst, port, int(ev.first_mono_ns or ev.mono_ns),
                                exe_key(f), new, owner=target.key,
                                user=_prevalence_user(w, f, bkey))
        elif kind == "flow.close" and self.beacons_on:
            dst, port = str(f.get("daddr") or ev.subject), int(f.get("dport") or 0)
            self.beacon.closed(self._beacon_key(w, f, cgroup), dst, port,
                               int(f.get("bytes_out") or 0) + int(f.get("bytes_in") or 0))

    def _remember(self, w, p, new: dict, reported: set[str], node_known,
                  hold: bool = False) -> None:
        """What the closed window saw becomes known to its profile (and the node's
        window's to the node), but for what findings reported (`reported` collects this
        tick's, for the node's window). `hold`: a model flagged the window and no finding
        came (yet): what it saw never seen stays news for the persistence horizon
        (Workload.pending; no learning from flagged windows), so the miner whose first
        window was unusual but alone is still new in the next one."""
        # What a finding reported stays never-seen (here and node-wide) until feedback
        # says "learn": the same destination or binary next time is news again, not
        # the attacker's now-familiar infrastructure. Everything else is known now.
        if self._reported:
            # A port number alone is no one's infrastructure (every job's first NFS
            # 2049 or 443 would be news again): a few become known; a scan's or a
            # fan-out's many stay news (one finding must not make 4000 ports known);
            # listeners stay news.
            reported |= {*new["exes"], *new["dsts"], *new["listens"]}
            if len(new["ports"]) <= PORTS_KNOWN_MAX:
                for port in new["ports"]:
                    p.known.ports.add(port)
                    node_known.ports.add(port)
            else:
                reported |= set(new["ports"])
            # ...but not to the workloads of the kind that reported them (Profile.told):
            # its investigation has them (a daily job's binaries, a timesyncd's new pool
            # server, the object store the next job container reads from, the next ssh
            # session's git clone). To other kinds and node-wide they stay news
            # (reported_exes, reported_news) until feedback.
            if w is not self.node:
                for item in new["exes"]:
                    p.told.add(item)
                    self.reported_exes.add(item)
                # a flood's thousands of destinations must not evict the rest
                for item in new["dsts"][:REPORTED_PER_FINDING]:
                    p.told.add(item)
                    self.reported_news.add(item)
                # a listener stays news, to this workload too: a bind shell on the
                # same port days later is found again (the 16 node-day eval missed 6)
                for item in new["listens"][:REPORTED_PER_FINDING]:
                    self.reported_news.add(item)
        else:
            held = {i for vs in new.values() for i in vs} if hold else ()
            p.known.commit(w.window, self.kernel_bytes, self.reported_news,
                           self.reported_exes, reported if w is self.node else w.seen, p.told,
                           held)
            if held:
                w.pending = [*w.pending, [self.now + self.persist_m * self.window_ns, new]][
                    -w.pending_max:]

    def _settle(self, w, p) -> None:
        """Held items whose persistence horizon passed without a finding become known."""
        due = [n for until, n in w.pending if until <= self.now]
        if due:
            w.pending = [e for e in w.pending if e[0] > self.now]
            for n in due:
                p.known.add_items(n, self.reported_news, self.reported_exes, w.seen, p.told)

    def _image_programs(self, w, p) -> None:
        """A new container (in a new pod) of a known kind: the programs it runs from its
        image's directories in its first image_grace_s are its image's (a new job
        version): no news to this container (Workload.seen), neither known to its kind (a
        running sibling that runs one is news) nor node-wide; its destinations and
        listeners are still news."""
        for k, info in w.window.exes.items():
            if k not in p.known.exes and k not in w.seen and _image_path(info.get("exe")):
                w.seen.add(k)
                self.counters["image_exes"] += 1

    def _rotating(self, w) -> frozenset[int]:
        """The workload's rotating-service ports (AnomalyConfig.rotating_services), worked
        out once per workload: the connect path asks for them on every connection."""
        if w.rotating is None:
            w.rotating = rotating_ports(self.cfg, w.cgroup, w.container)
        return w.rotating

    def _image_start(self, w, p, start: int) -> bool:
        """Whether window `start` is within image_grace_s of a container's first event, for
        a container of a kind already modelled, in a pod (parent cgroup) never seen before
        (a container restarted in its pod, or evicted and seen again, is not new), first
        seen once this process had run that long (after a (re)start, a running container
        is not new)."""
        grace = int(self.cfg.image_grace_s * 1e9)
        return bool(grace and w.container and w.new_pod and p.windows >= PROFILE_MIN and
                    w.first_ns and self.up_ns is not None and
                    w.first_ns - self.up_ns > grace and start - w.first_ns <= grace)

    @staticmethod
    def _beacon_key(w, f, cgroup: str) -> str:
        if w is None:
            return "node"
        return beacon_key(w.container, cgroup) or w.key

    def _workload(self, f, cgroup: str, now: int) -> Workload | None:
        container = f.get("container") or f.get("container_id") or ""
        container = container if isinstance(container, str) else ""
        key = container or cgroup
        if not key:
            return None
        w = self.workloads.get(key)
        if w is None:
            if len(self.workloads) >= self.cfg.max_workloads:
                self._evict()
            w = self._new_workload(key, cgroup, container, profile_of(cgroup or container))
            w.first_ns = now
            pod = cgroup.rstrip("/").rsplit("/", 1)[0] if container and cgroup else ""
            w.new_pod = bool(pod) and pod not in self.pods
            if pod:
                self.pods.add(pod)
        elif cgroup and not w.cgroup:
            w.cgroup = cgroup
        w.last_ns = now
        return w

    def _new_workload(self, key: str, cgroup: str, container: str, profile: str) -> Workload:
        w = Workload(key, cgroup, container, profile, self.persist_m,
                     self.cfg.recent_events)
        if key != "node":
            self.workloads[key] = w
        self._profile(profile)
        return w

    def _evict(self) -> None:
        idle = min(self.workloads.values(), key=lambda w: (w.window.active, w.last_ns))
        del self.workloads[idle.key]
        self.counters["workloads_evicted"] += 1
        used = {w.profile for w in self.workloads.values()} | {"node"}
        if len(self.profiles) > self.cfg.max_workloads:
            victim = min((p for k, p in self.profiles.items() if k not in used),
                         key=lambda p: p.last_ns, default=None)
            if victim is not None:
                self.profiles = {k: p for k, p in self.profiles.items() if p is not victim}
                self.counters["profiles_evicted"] += 1

    def _profile(self, key: str) -> Profile:
        p = self.profiles.get(key)
        if p is None:
            p = self.profiles[key] = Profile(self.cfg, self.models)
        return p

    def _calibrator(self, det: str, kind: str) -> Calibrator:
        return self.cal.setdefault(f"{det}/{kind}", Calibrator())

    # -- windows --------------------------------------------------------------------------

    def tick(self, now_ns: int) -> list[Finding]:
        """Close the window if due, score it, score beacons; the findings to handle
        (shadow-mode ones are counted and kept in status instead)."""
        if self._rebase_from is not None:
            self._rebase(now_ns)
        self.now = max(self.now, now_ns)
        if self.started_ns is None:
            self.started_ns = now_ns
        if self.up_ns is None:
            self.up_ns = now_ns      # this process's first tick (not restored)
        if self.window_start is None:
            self.window_start = now_ns - now_ns % self.window_ns
        out: list[Finding] = []
        if now_ns >= self.window_start + self.window_ns:
            start, end = self.window_start, self.window_start + self.window_ns
            out += self._close(start, end, now_ns)
            self.window_start = now_ns - now_ns % self.window_ns
        if self.beacons_on:
            out += slow.beacon_findings(self, now_ns)
        return out

    def warm(self, now_ns: int | None = None) -> bool:
        now = self.now if now_ns is None else now_ns
        return self.started_ns is not None and \
            now - self.started_ns >= self.cfg.warmup_s * 1e9

    def alerting(self, det: str, kind: str = "workload") -> bool:
        if det == "beacon":
            return True
        if not self.warm():
            return False
        if det in ("newexe", "drift"):
            return True
        cal = self._calibrator(det, kind)
        return cal.n >= self.cfg.warmup_windows and cal.fit is not None

    def _close(self, start: int, end: int, now: int) -> list[Finding]:
        out: list[Finding] = []
        node_known = self.profiles["node"].known
        warm = self.warm(now)
        fired: set[str] = set()     # detectors a workload fired on in this window
        reported: set[str] = set()  # never-seen items findings of this window named
        # The node last: a node finding that only repeats a workload's is left out.
        for w in [*self.workloads.values(), self.node]:
            if w is not self.node and not w.window.active:
                continue
            kind = "node" if w is self.node else "workload"
            p = self._profile(w.profile)
            p.last_ns = now
            if w.pending:
                self._settle(w, p)
            if self._image_start(w, p, start):
                self._image_programs(w, p)
            raw, new = w.window.vector(p.known, node_known, self.kernel_bytes,
                                       Either(w.seen, p.told), self._rotating(w), p.fresh)
            if warm and p.windows >= PROFILE_MIN:    # (a start-up's every block is new)
                p.keep_fresh(new["dsts"], now)
            x = scale(raw)
            near = held = False
            for det in self.models if p.windows >= PROFILE_MIN else ():
                s = p.score(det, x)
                cal = self._calibrator(det, kind)
                tail = cal.tail(s)
                flagged = tail <= self.p_window
                near |= tail <= NEAR_P
                held |= flagged
                if not flagged:
                    cal.add(s)
                self.counters[f"windows.{det}"] += 1
                n = w.flag(det, flagged, start)
                if flagged and (n >= self.cfg.persistence_k or raw[LISTEN] >= 1) or \
                        tail <= self.cfg.false_alarm_rate:
                    if p.covered(x):      # learned as normal (feedback)
                        self.counters[f"learned_match.{det}"] += 1
                        fired.add(det)    # and the node's window does not repeat it
                        continue
                    # The node speaks for activity of no workload: what its workloads did
                    # is their models' to judge (a cold profile learns first).
                    if w is self.node and (det in fired or not self.unattributed):
                        self.counters[f"covered.{det}"] += 1
                        continue
                    fired.add(det)
                    f = self._window_finding(det, kind, w, p, x, raw, new, s, tail, cal, start,
                                             end, now)
                    if f is not None:
                        out.append(f)
            if "newexe" in self.dets and w is not self.node:
                self.counters["windows.newexe"] += 1
            if "newexe" in self.dets and w is not self.node and raw[1] >= 1:
                f = self._newexe_finding(w, p, x, raw, new, start, end, now)
                if f is not None:
                    out.append(f)
            if "drift" in self.dets:
                self.counters["windows.drift"] += 1
                f = slow.drift_finding(self, w, p, x, start, end, now, warm)
                if f is not None:
                    out.append(f)
            if not warm or p.windows < PROFILE_MIN or not near or p.covered(x):
                p.learn(x)
            self._remember(w, p, new, reported, node_known,
                           hold=held and warm and w is not self.node)
            self._reported = False
            p.windows += 1
            w.window = type(w.window)()
        self.unattributed = False
        return out

    # -- findings -------------------------------------------------------------------------

    def _window_finding(self, det, kind, w, p, x, raw, new, s, tail, cal, start, end, now):
        if self.cfg.require_novelty and not any(raw[i] > 0 for i in NOVEL):
            self.counters[f"volume_only.{det}"] += 1     # see AnomalyConfig.require_novelty
            return None
        drv = drivers_of(p.scorer(det), x, p.stats.mean)
        sc = fx.scope(w, self.node_name, drv, new, self.kernel_bytes)
        far = self.cfg.false_alarm_rate
        ev = self._evidence(det, s, cal.threshold(far), far, start, end, drv, sc, new)
        ev["tail_probability"] = tail
        ev["vector"] = [round(v, 4) for v in x]     # what learn() takes as normal
        ev["profile"] = w.profile
        ev["summary"] = fx.window_summary(det, w, tail, drv, sc, new)
        sev = Severity.HIGH if tail <= far / HIGH_FACTOR else Severity.MEDIUM
        return self._emit(det, kind, w, tail, sev, w.run_start.get(det, start), now, ev,
                          fx.group(drv))

    def _newexe_finding(self, w, p, x, raw, new, start, end, now):
        drv = [{"feature": "new_exes", "value": raw[1], "baseline": 0, "contribution": 1.0}]
        sc = fx.scope(w, self.node_name, drv, new, self.kernel_bytes)
        ev = self._evidence("newexe", raw[1], 0.5, None, start, end, drv, sc, new)
        paths = [self.exe_paths.get(k, k) for k in new["exes"][:3]]
        ev["summary"] = (f"newexe: {fx.name(w)} ran {int(raw[1])} executable(s) never seen "
                         f"on this node: {', '.join(paths)}")
        return self._emit("newexe", "workload", w, None, Severity.MEDIUM, start, now, ev)

    def _evidence(self, det, score, threshold, far, start, end, drv, sc, new) -> dict[str, Any]:
        return {"detector": det, "model_version": MODEL_VERSION, "score": _round(score),
                "threshold": _round(threshold), "false_alarm_rate": far,
                "window_s": self.cfg.window_s, "windows": [int(start), int(end)],
                "drivers": drv, "scope": sc, "new": new, "node": self.node_name}

    def _emit(self, det, kind, w, tail, sev, first_ns, now, ev, group="") -> Finding | None:
        """Dedup (one per workload, detector and kind of driver -- executables, network,
        listeners, GPU -- per dedup_s unless 100 times less likely), then shadow (counted,
        kept in status) or returned. Only a returned finding (or a duplicate of one)
        marks what its window saw as reported (engine._remember): a shadow finding of the
        warm-up is no investigation anyone can answer, so what it saw is learned as the
        rest of the warm-up is (it stayed news for good: one day-0 S3 block, seen in a
        warm-up window that was flagged, was raised again in every later job container)."""
        key = f"{det}:{group}" if group else det
        last = w.last_alert.get(key)
        # What is new in it (executables, destinations, ports, listeners): a finding that
        # brings something the last one of its kind did not is no duplicate (a decoy must
        # not buy the attacker dedup_s of silence for what comes after it).
        news = {f"{k}:{v}" for k, vs in (ev.get("new") or {}).items()
                if isinstance(vs, list) for v in vs}
        told = set(last[2]) if last is not None and len(last) > 2 else set()
        recent = last is not None and now - last[0] < self.cfg.dedup_s * 1e9
        # (>=: a tail that underflowed to 0.0 is not less likely than a last one of 0.0)
        if recent and (tail is None or tail >= last[1] / HIGH_FACTOR) and news <= told:
            self.counters[f"dedup.{det}"] += 1
            self._reported = True
            return None
        alerting = self.alerting(det, kind)
        self._count(det, alerting)
        f = fx.finding(det, MODEL_VERSION, w.entity, sev, int(first_ns), now, ev)
        if not alerting:
            # neither reported nor a reason to deduplicate the first finding after it
            self.shadow.append({"rule": f.rule_id, "entity": f.entity, "detected_mono_ns": now,
                                "summary": ev.get("summary", "")})
            return None
        self._reported = True
        told = (told if recent else set()) | news
        w.last_alert[key] = [now, 1.0 if tail is None else tail, sorted(told)[:DEDUP_NEWS]]
        return f

    def _count(self, det: str, alerting: bool) -> None:
        self.counters[f"{'hits' if alerting else 'shadow_hits'}.{det}"] += 1

    # -- feedback, evidence, status -------------------------------------------------------

    def learn(self, evidence: dict[str, Any], tag: str = "") -> None:
        """"Learn as normal" feedback for one finding's evidence (agent.detect.anomaly.teach);
        `tag` (the feedback record) remembers what it changed, for `unlearn`."""
        teach.learn(self, evidence, tag)

    def unlearn(self, tag: str) -> dict[str, int]:
        """The feedback record `tag` reverted: what its learning changed is news again."""
        return teach.unlearn(self, tag)

    def recent(self, workload: str) -> list[dict[str, Any]]:
        """Recent exec/connect events of a workload (container id, cgroup path or entity
        "cgroup:<path>"; "node" for events without a workload), oldest first."""
        key = workload[len("cgroup:"):] if workload.startswith("cgroup:") else workload
        if key == "node":
            return list(self.node.recent)
        w = self.workloads.get(key) or next(
            (w for w in self.workloads.values() if w.cgroup == key), None)
        return list(w.recent) if w is not None else []

    def status(self) -> dict[str, Any]:
        dets = {}
        far = self.cfg.false_alarm_rate
        for det in self.dets:
            cal = self.cal.get(f"{det}/workload")
            thr = cal.threshold(far) if cal is not None and det in MODELS else \
                self.cfg.beacon.threshold if det == "beacon" else \
                self.cfg.drift.z if det == "drift" else 0.5 if det == "newexe" else None
            dets[det] = {"mode": "alerting" if self.alerting(det) else "shadow",
                         "windows": self.counters[f"windows.{det}"] if det != "beacon"
                         else self.beacon.scored,
                         "threshold": _round(thr), "false_alarm_rate": far if det in MODELS else None,
                         "hits": self.counters[f"hits.{det}"],
                         "shadow_hits": self.counters[f"shadow_hits.{det}"],
                         "deduplicated": self.counters[f"dedup.{det}"]}
        return {"model_version": MODEL_VERSION, "detectors": dets,
                "warm": self.warm(), "workloads": len(self.workloads),
                "profiles": len(self.profiles), "beacon_pairs": len(self.beacon.pairs),
                "evicted": self.counters["workloads_evicted"] + self.beacon.evicted,
                "malformed_events": self.counters["events_malformed"],
                "learned": self.counters["learned"], "unlearned": self.counters["unlearned"],
                "unlearn_lost": self.taught.lost, "restored": self.restored,
                "replaced_exes": self.counters["replaced_exes"],
                "image_exes": self.counters["image_exes"],
                "volume_only": {d: self.counters[f"volume_only.{d}"] for d in self.models},
                "shadow": list(self.shadow)}

    def _rebase(self, now_ns: int) -> None:
        from agent.detect.anomaly.persist import rebase

        rebase(self, now_ns - self._rebase_from)
        self._rebase_from = None

    def snapshot(self, wall_s: float | None = None) -> dict[str, Any]:
        from agent.detect.anomaly.persist import snapshot

        return snapshot(self, wall_s)

    @classmethod
    def restore(cls, cfg: AnomalyConfig, node: str, snap: dict[str, Any],
                now_mono_ns: int | None = None, now_wall_s: float | None = None,
                known: tuple[str, ...] = ()) -> "AnomalyEngine":
        """An engine from a snapshot; raises ValueError (one sentence) on a snapshot of an
        unknown format or another feature set. Times are rebased: onto now_mono_ns less the
        wall-clock downtime where both clocks are given, else onto the first time seen."""
        from agent.detect.anomaly.persist import restore

        return restore(cls(cfg, node, known), snap, now_mono_ns, now_wall_s)


def _image_path(path: Any) -> bool:
    """A program path an image ships (IMAGE_DIRS), not one dropped at run time."""
    return isinstance(path, str) and path.startswith(IMAGE_DIRS) and "/../" not in path \
        and not path.endswith(" (deleted)")


def _prevalence_user(w, f: dict[str, Any], bkey: str) -> str:
    """Who a connection counts as for its destination's prevalence: a container is itself;
    on the host, an account other than root is one user whatever unit it runs in (its
    session, `systemd-run --user`, its crontab in cron.service); root's units each."""
    if w is not None and w.container:
        return bkey
    uid = f.get("uid")
    try:
        return f"uid:{int(uid)}" if uid is not None and int(uid) != 0 else bkey
    except (TypeError, ValueError):
        return bkey


def _recent(ev: Event) -> dict[str, Any]:
    f = ev.fields
    keep = ("pid", "uid", "comm", "exe", "exe_id", "exe_sha256", "daddr", "dport", "outcome")
    return {"kind": ev.kind, "mono_ns": ev.mono_ns, "subject": ev.subject,
            **{k: f.get(k) for k in keep if f.get(k) is not None}}


def _round(v):
    return None if v is None else round(float(v), 6)
