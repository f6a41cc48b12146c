"""The .deb on a clean Debian 12: built by packaging/build.sh, installed with apt into a
fresh debootstrap root (dependencies from Debian's mirror alone), run against a network
namespace with exactly the unit's capabilities, upgraded, removed and purged.

The minbase root is cached as a tarball under .cache/packaging/ (the first debootstrap
takes about half a minute), and downloaded .debs under .cache/packaging/apt-archives.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

from swarmlab.lab import sh, wait_for
from tests.conftest import skip_unsupported

# Both build the packages from this checkout (packaging/build.sh, dist/): one worker.
pytestmark = [pytest.mark.privileged, pytest.mark.xdist_group("packaging")]

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "packaging"
ROOT_TAR = CACHE / "debian-bookworm-minbase.tar"
ARCHIVES = CACHE / "apt-archives"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
UNIT = REPO / "packaging" / "swarm-agent.service"
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", "--no-install-recommends"]


def debian_mirror() -> str:
    """The Debian mirror this host's apt uses for bookworm (not the security archive)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        # one-line format: deb [opts] URI SUITE COMPONENTS...
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
        # deb822 format: a stanza with URIs: and Suites: listing bookworm
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split() \
                    and "security" not in uris.group(1):
                return uris.group(1)
    return "http://deb.debian.org/debian"


def run(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def cached_root_tar() -> Path:
    """Debootstrap bookworm minbase once; later runs unpack the tarball. Other engineers'
    test runs share the cache: one builds it under the lock, the others wait for it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ROOT_TAR.exists():
            return ROOT_TAR
        for tool in ("debootstrap", "dpkg-deb"):
            if shutil.which(tool) is None:
                skip_unsupported(f"needs {tool} (run install.sh --test)")
        build = Path(tempfile.mkdtemp(dir=CACHE, prefix="root."))
        try:
            run("debootstrap", "--variant=minbase", "bookworm", str(build), debian_mirror(), timeout=1200)
            run("chroot", str(build), "apt-get", "clean")
            tmp = ROOT_TAR.with_suffix(".tar.tmp")
            run("tar", "--numeric-owner", "-C", str(build), "-cpf", str(tmp), ".")
            tmp.rename(ROOT_TAR)
        finally:
            run("rm", "-rf", "--one-file-system", str(build))
    return ROOT_TAR


def seed_archives(root: Path) -> None:
    """Hand the root the .debs earlier runs downloaded (hard links: same file system)."""
    target = root / "var/cache/apt/archives"
    for deb in ARCHIVES.glob("*.deb"):
        with contextlib.suppress(FileExistsError):
            try:
                os.link(deb, target / deb.name)
            except OSError:
                shutil.copyfile(deb, target / deb.name)


def save_archives(root: Path) -> None:
    """Keep what apt downloaded; written aside and renamed, as concurrent runs share it."""
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        dest = ARCHIVES / deb.name
        if not dest.exists():
            tmp = ARCHIVES / f".{deb.name}.{os.getpid()}"
            shutil.copyfile(deb, tmp)
            tmp.rename(dest)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def kill_processes_in(root: Path) -> None:
    """Kill whatever still runs chrooted in `root`, so its mounts can go."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if Path(proc / "root").resolve() == root.resolve():
                subprocess.run(["kill", "-KILL", proc.name], capture_output=True)


@pytest.fixture(scope="module")
def deb_package() -> Path:
    """dist/swarm-agent_<version>_<arch>.deb, built by the one build command."""
    proc = run(str(REPO / "packaging" / "build.sh"), "deb", timeout=600)
    deb = REPO / proc.stdout.strip().splitlines()[-1]
    assert deb.name == f"swarm-agent_{VERSION}_amd64.deb" or deb.name.startswith(f"swarm-agent_{VERSION}_")
    return deb


@pytest.fixture
def debian_root(tmp_path: Path) -> Iterator[Path]:
    """A fresh bookworm minbase root with /proc, /sys, /dev mounted, service starts denied
    (policy-rc.d) and apt's downloads seeded from .cache/. Cleanup kills anything
    still running in it, unmounts, and deletes it without crossing into other file systems."""
    root = tmp_path / "root"
    root.mkdir()
    run("tar", "--numeric-owner", "-C", str(root), "-xpf", str(cached_root_tar()))
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\n# no service starts in a test root\nexit 101\n")
    (root / "usr/sbin/policy-rc.d").chmod(0o755)
    ARCHIVES.mkdir(parents=True, exist_ok=True)
    seed_archives(root)
    try:
        run("mount", "-t", "proc", "proc", str(root / "proc"))
        for api in ("sys", "dev"):
            run("mount", "--rbind", f"/{api}", str(root / api))
            run("mount", "--make-rslave", str(root / api))  # unmounting must not reach the host
        run("chroot", str(root), *APT, "update", timeout=300)
        yield root
    finally:
        kill_processes_in(root)
        for point in ("dev", "sys", "proc"):
            subprocess.run(["umount", "-R", str(root / point)], capture_output=True)
        left = mounts_under(root)
        assert not left, f"still mounted, not deleting {root}: {left}"
        run("rm", "-rf", "--one-file-system", str(root))


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace with lo and a veth pair up (an interface for XDP); deleted after."""
    name = f"swa-pkg-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        sh("ip", "-n", name, "link", "set", "p0", "up")
        sh("ip", "-n", name, "link", "set", "p1", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def assert_no_attack_code(deb: Path) -> None:
    """The package's own file list (dpkg -c) holds the product only: no lab, no attack
    generators, no demo scenarios, no tests or benches."""
    listing = run("dpkg-deb", "-c", str(deb)).stdout
    paths = [line.split()[-1] for line in listing.splitlines() if line.strip()]
    assert any(p.endswith("/agent/daemon.py") for p in paths), listing[:2000]
    banned = ("swarmlab", "/attacks/", "lab.py", "breachlab", "scenario", "demo.py",
              "/tests/", "/bench/")
    offending = [p for p in paths if any(b in p for b in banned)]
    assert not offending, f"the package carries non-product files: {offending}"


def install(root: Path, deb: Path) -> None:
    target = root / "tmp" / deb.name
    target.write_bytes(deb.read_bytes())
    run("chroot", str(root), *APT, "install", f"/tmp/{deb.name}", timeout=600)
    save_archives(root)


def unit_capabilities() -> list[str]:
    m = re.search(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M)
    assert m, "the unit must bound its capabilities"
    return m.group(1).split()


def nft_tables(ns: str) -> str:
    return sh("nft", "list", "tables", ns=ns).stdout


@contextlib.contextmanager
def packaged_agent(root: Path, ns: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`swarm-agent run` from the installed package, chrooted into `root`, inside `ns`, with
    only the capabilities of the systemd unit. The namespace's own /sys and a tracefs are
    mounted in the private mount namespace `ip netns exec` makes, as a host provides them
    to the service. SIGTERM (then SIGKILL) on exit."""
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in unit_capabilities())
    script = (f'mount --rbind /sys "{root}/sys" && '
              f'mount -t tracefs nodev "{root}/sys/kernel/tracing" && '
              f'exec chroot "{root}" setpriv --bounding-set=-all,{caps} '
              f'swarm-agent run --config /etc/swarm-agent/config.yaml')
    with open(log, "wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", script],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def status(root: Path, ns: str) -> subprocess.CompletedProcess[str]:
    return sh("chroot", str(root), "swarm-agent", "status", ns=ns, check=False, timeout=30)


def test_deb_installs_runs_and_removes_cleanly(deb_package, debian_root, namespace, tmp_path):
    root, ns = debian_root, namespace
    install(root, deb_package)

    version = run("chroot", str(root), "swarm-agent", "--version").stdout.strip()
    assert version == f"swarm-agent {VERSION}"
    assert (root / "etc/swarm-agent/config.yaml").is_file()
    assert (root / "etc/systemd/system/multi-user.target.wants/swarm-agent.service").is_symlink(), \
        "postinst enables the service"
    assert (root / "var/lib/swarm-agent").stat().st_mode & 0o777 == 0o700
    assert list((root / "usr/lib/swarm-agent/agent").rglob("__pycache__/*.pyc")), "postinst compiles"
    assert_no_attack_code(deb_package)
    demo = run("chroot", str(root), "swarm-agent", "demo", "--list", check=False)
    assert demo.returncode == 4 and "source checkout" in demo.stderr, demo

    log = tmp_path / "agent.log"
    with packaged_agent(root, ns, log) as agent:
        def ready():
            assert agent.poll() is None, f"agent exited {agent.returncode}:\n{log.read_text()[-3000:]}"
            st = status(root, ns)
            return st if st.returncode == 0 and "handle_xdp" in st.stdout else None
        try:
            st = wait_for(ready, timeout_s=60, interval_s=0.5)
        except TimeoutError:
            pytest.fail(f"packaged agent never reported ready:\n{log.read_text()[-3000:]}")
        # Every probe the packaged objects carry loads with the unit's capabilities.
        assert "failed" not in st.stdout, st.stdout
        assert "inet swarm_agent" in nft_tables(ns)
    assert agent.returncode == 0, log.read_text()[-3000:]
    assert "inet swarm_agent" in nft_tables(ns), "stopping keeps the mitigations in force"

    # Removal runs in the namespace: prerm's `swarm-agent cleanup` acts on the table there.
    sh("chroot", str(root), *APT, "remove", "swarm-agent", ns=ns, timeout=300)
    assert "swarm_agent" not in nft_tables(ns)
    assert not (root / "usr/lib/swarm-agent").exists() and not (root / "usr/bin/swarm-agent").exists()
    assert (root / "var/lib/swarm-agent/agent.db").is_file(), "remove keeps incident history"
    assert (root / "etc/swarm-agent/config.yaml").is_file(), "remove keeps the config"

    run("chroot", str(root), *APT, "purge", "swarm-agent")
    assert not (root / "var/lib/swarm-agent").exists()
    assert not (root / "etc/swarm-agent").exists()


def repack(deb: Path, version: str, out_dir: Path) -> Path:
    """The same package under a newer version: an upgrade without a second checkout."""
    tree = out_dir / "tree"
    run("dpkg-deb", "-R", str(deb), str(tree))
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.M))
    new = out_dir / f"{deb.name.split('_')[0]}_{version}_amd64.deb"
    run("dpkg-deb", "--root-owner-group", "--build", str(tree), str(new))
    return new


def test_deb_upgrade_keeps_local_config_and_state(deb_package, debian_root, tmp_path):
    root = debian_root
    install(root, deb_package)
    config = root / "etc/swarm-agent/config.yaml"
    config.write_text(config.read_text() + "\n# local edit\nlog_level: debug\n")
    rules = root / "etc/swarm-agent/rules/network.yaml"
    rules.write_text(rules.read_text() + "\n# tuned here\n")
    marker = root / "var/lib/swarm-agent/agent.db"
    marker.write_bytes(b"incident history stand-in")

    install(root, repack(deb_package, f"{VERSION}+upgrade1", tmp_path))
    installed = run("chroot", str(root), "dpkg-query", "-W", "-f=${Version}", "swarm-agent").stdout
    assert installed == f"{VERSION}+upgrade1"
    assert config.read_text().endswith("log_level: debug\n"), "upgrade keeps local config edits"
    assert rules.read_text().endswith("# tuned here\n"), "upgrade keeps local rule edits"
    assert marker.read_bytes() == b"incident history stand-in", "upgrade leaves the state alone"
    link = root / "usr/lib/swarm-agent/agent/rules/network.yaml"
    assert os.readlink(link) == "/etc/swarm-agent/rules/network.yaml"
    assert run("chroot", str(root), "swarm-agent", "--version").stdout.strip() == f"swarm-agent {VERSION}"


# ---- swarm-mesh
MESH_LAUNCHER = "/usr/bin/swarm-mesh"
# The unit's process, as near as a host without systemd gets: its user and group alone, no
# capabilities, no new privileges, MemoryDenyWriteExecute (the kernel's PR_SET_MDWE, kept
# across exec), the environment systemd gives it.
AS_THE_UNIT = ("setpriv --reuid=swarm-mesh --regid=swarm-mesh --clear-groups --bounding-set=-all "
               "--inh-caps=-all --no-new-privs env -i HOME=/var/lib/swarm-mesh PATH=/usr/bin:/bin "
               "python3 -I -c 'import ctypes, os, sys; ctypes.CDLL(None).prctl(65, 1, 0, 0, 0); "
               "os.execv(sys.argv[1], sys.argv[1:])' ")
HEALTH = """import grpc, sys
sys.path.insert(0, "/usr/lib/swarm-mesh")
from agent.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
read = lambda name: open("/root/n1/" + name, "rb").read()
creds = grpc.ssl_channel_credentials(read("ca.pem"), read("node.key"), read("node.pem"))
channel = grpc.secure_channel("127.0.0.1:7443", creds)   # a SAN of the mesh certificate
print(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status)
"""


@pytest.fixture(scope="module")
def mesh_deb() -> Path:
    proc = run(str(REPO / "packaging" / "build.sh"), "mesh-deb", timeout=600)
    deb = REPO / proc.stdout.strip().splitlines()[-1]
    assert deb.name.startswith(f"swarm-mesh_{VERSION}_"), deb.name
    return deb


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def test_mesh_deb_installs_inits_serves_as_its_user_and_purges(mesh_deb, debian_root, namespace,
                                                               tmp_path):
    root, ns = debian_root, namespace
    root.chmod(0o755)          # as a real /: the cached tarball keeps mkdtemp's 0700
    install(root, mesh_deb)
    assert not (root / "usr/lib/swarm-agent").exists(), "the mesh pulls in no agent"
    assert run("chroot", str(root), "swarm-mesh", "--version").stdout.strip() == f"swarm-mesh {VERSION}"
    uid, gid = (int(x) for x in run("chroot", str(root), "getent", "passwd", "swarm-mesh")
                .stdout.split(":")[2:4])
    assert uid != 0 and owner_and_mode(root / "var/lib/swarm-mesh") == (uid, gid, 0o700)
    assert owner_and_mode(root / "etc/swarm-mesh") == (0, gid, 0o750)
    assert (root / "etc/systemd/system/multi-user.target.wants/swarm-mesh.service").is_symlink()

    # As root: the launcher passes --group swarm-mesh to init; enroll a node for the check.
    run("chroot", str(root), "swarm-mesh", "init", "--dir", "/etc/swarm-mesh", "--name", "localhost",
        "--listen", "127.0.0.1:7443", "--nats-listen", "127.0.0.1:4222")
    etc = root / "etc/swarm-mesh"
    assert owner_and_mode(etc / "ca.key") == (0, 0, 0o600), "the service cannot read the CA key"
    for name in ("config.yaml", "mesh.key", "decisions.key", "nats/nats.conf", "nats/mesh.password"):
        assert owner_and_mode(etc / name) == (0, gid, 0o640), name
    run("chroot", str(root), "swarm-mesh", "enroll", "n1", "--provider", "p1",
        "--dir", "/etc/swarm-mesh", "--out", "/root/n1")

    log = tmp_path / "mesh.log"
    script = f'exec chroot "{root}" {AS_THE_UNIT}{MESH_LAUNCHER} run --config /etc/swarm-mesh/config.yaml'
    with open(log, "wb") as out:
        mesh = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", script],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready():
            assert mesh.poll() is None, f"mesh exited {mesh.returncode}:\n{log.read_text()[-3000:]}"
            line = next((x for x in log.read_text().splitlines() if x.startswith('{"listening"')), None)
            return json.loads(line) if line else None
        try:
            up = wait_for(ready, timeout_s=30, interval_s=0.2)
        except TimeoutError:
            pytest.fail(f"packaged mesh never came up:\n{log.read_text()[-3000:]}")
        health = sh("chroot", str(root), "python3", "-I", "-c", HEALTH, ns=ns, check=False)
        assert health.stdout.strip() == "1", health.stderr[-2000:]          # SERVING
        status = Path(f"/proc/{up['nats_pid']}/status").read_text()
        assert re.search(rf"^Uid:\t{uid}\t", status, re.M) and "CapEff:\t0000000000000000" in status
        # Root's query runs as the service user (the launcher), so the store stays its own.
        nodes = sh("chroot", str(root), "swarm-mesh", "nodes", ns=ns, check=False)
        assert nodes.returncode == 0, nodes.stderr
    finally:
        mesh.send_signal(signal.SIGTERM)
        try:
            mesh.wait(timeout=20)
        except subprocess.TimeoutExpired:
            mesh.kill()
            mesh.wait(timeout=5)
    assert mesh.returncode == 0, log.read_text()[-3000:]
    state = root / "var/lib/swarm-mesh"
    made = [p for p in state.rglob("*")]
    assert state / "mesh.db" in made and state / "decisions.lock" in made and state / "jetstream" in made
    assert {p.stat().st_uid for p in made} == {uid}, "everything in the state is the service's"

    config = (etc / "config.yaml").read_bytes()
    install(root, repack(mesh_deb, f"{VERSION}+upgrade1", tmp_path))
    assert (etc / "config.yaml").read_bytes() == config and (etc / "ca.key").is_file()
    assert owner_and_mode(state) == (uid, gid, 0o700) and (state / "mesh.db").is_file()

    run("chroot", str(root), *APT, "remove", "swarm-mesh")
    assert not (root / "usr/lib/swarm-mesh").exists()
    assert (etc / "ca.key").is_file() and (state / "mesh.db").is_file(), "remove keeps keys and state"
    run("chroot", str(root), *APT, "purge", "swarm-mesh")
    assert not etc.exists() and not state.exists()
