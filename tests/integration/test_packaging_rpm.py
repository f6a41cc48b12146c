"""The .rpm: built by packaging/build.sh with rpmbuild; its file list, declared
dependencies and scriptlets read back with `rpm -qp`; installed into a scratch root with
`rpm --root` to check that every path the systemd unit names is where it expects it.
Also the unit's `systemd-analyze security` exposure stays within its recorded budget."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import skip_unsupported

# Both build the packages from this checkout (packaging/build.sh, dist/): one worker.
pytestmark = [pytest.mark.privileged, pytest.mark.xdist_group("packaging")]

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
UNIT = REPO / "packaging" / "swarm-agent.service"
# packaging/README.md records the score; a change that loosens the sandbox must say so there.
EXPOSURE_BUDGET = 3.7   # 3.4 + CAP_SYS_ADMIN (0.3) for the file policy


def run(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def rpm_package() -> Path:
    if shutil.which("rpmbuild") is None:
        skip_unsupported("needs rpmbuild (apt-get install rpm; install.sh --test does)")
    out = run(str(REPO / "packaging" / "build.sh"), "rpm", timeout=600)
    rpm = REPO / out.strip().splitlines()[-1]
    assert rpm.name == f"swarm-agent-{VERSION}-1.x86_64.rpm", rpm.name
    return rpm


def declared_rpm_dependencies() -> set[str]:
    deps = set()
    for line in (REPO / "packaging" / "dependencies").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        dep = line.split("|")[1].strip()
        if dep != "-":
            deps.add(dep)
    return deps


def unit_setting(key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", UNIT.read_text(), re.M)


def test_rpm_file_list_has_the_whole_package(rpm_package):
    files = set(run("rpm", "-qp", "--list", str(rpm_package)).split())
    for path in ("/usr/bin/swarm-agent", "/etc/swarm-agent/config.yaml",
                 "/etc/swarm-agent/rules/network.yaml", "/usr/lib/systemd/system/swarm-agent.service",
                 "/var/lib/swarm-agent"):
        assert path in files
    # Built from the package tree: every module, probe object and rules file of the checkout.
    tree = REPO / "agent"
    expected = {f"/usr/lib/swarm-agent/agent/{p.relative_to(tree)}"
                for p in tree.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".o", ".yaml")
                and p.name != "abi.bpf.o"}         # the ABI mirror for tests, never loaded
    assert any(p.endswith(".bpf.o") for p in expected), "build the probes first (make -C probes)"
    assert expected - files == set()
    assert not any("__pycache__" in f for f in files)
    # The product only: the lab (attack generators, demo scenarios), tests and benches stay
    # in the checkout.
    banned = ("swarmlab", "/attacks/", "lab.py", "breachlab", "scenario", "demo.py",
              "/tests/", "/bench/")
    assert not [f for f in files if any(b in f for b in banned)]

    flags = run("rpm", "-qp", "--qf", r"[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(rpm_package))
    config = dict(line.rsplit(" ", 1) for line in flags.splitlines() if line.startswith("/etc/"))
    assert "c" in config["/etc/swarm-agent/config.yaml"] and "n" in config["/etc/swarm-agent/config.yaml"], \
        "config is %config(noreplace): upgrades keep local edits"
    assert "n" in config["/etc/swarm-agent/rules/network.yaml"]


def test_rpm_requires_exactly_the_declared_dependencies(rpm_package):
    requires = {r.strip() for r in run("rpm", "-qp", "--requires", str(rpm_package)).splitlines()}
    ours = {r for r in requires if not r.startswith("rpmlib(") and r != "/bin/sh"}
    assert ours == declared_rpm_dependencies()


def test_rpm_scriptlets_enable_restart_and_clean_up(rpm_package):
    scripts = run("rpm", "-qp", "--scripts", str(rpm_package))
    parts = dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
                            scripts, re.M | re.S))
    assert set(parts) >= {"postinstall", "preuninstall", "postuninstall"}
    assert "systemctl enable swarm-agent.service" in parts["postinstall"]
    assert "[ $1 -eq 1 ]" in parts["postinstall"], "enable only on first install"
    assert "[ $1 -eq 0 ]" in parts["preuninstall"], "stop and clean up on erase, not upgrade"
    assert "swarm-agent cleanup" in parts["preuninstall"]
    assert "disable --now" in parts["preuninstall"]
    assert "try-restart" in parts["postuninstall"], "upgrade restarts the service"
    code = "\n".join(line for line in scripts.splitlines() if not line.lstrip().startswith("#"))
    assert "/var/lib/swarm-agent" not in code, "no scriptlet touches the state"


def test_rpm_installs_where_the_unit_expects(rpm_package, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run("rpm", "--root", str(scratch), "--initdb")
    run("rpm", "--root", str(scratch), "-i", "--nodeps", "--noscripts", str(rpm_package))

    exec_start = unit_setting("ExecStart")[0].split()
    binary, config = exec_start[0], exec_start[exec_start.index("--config") + 1]
    assert os.access(scratch / binary.lstrip("/"), os.X_OK), binary
    assert (scratch / config.lstrip("/")).is_file(), config
    assert (scratch / "usr/lib/systemd/system/swarm-agent.service").read_text() == UNIT.read_text()
    state = scratch / "var/lib" / unit_setting("StateDirectory")[0]
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
    for path in unit_setting("ReadWritePaths")[0].split():
        # /run is a tmpfs that RuntimeDirectory= creates at start; the rest ships.
        assert path.startswith("/run/") or (scratch / path.lstrip("/")).is_dir(), path
    link = scratch / "usr/lib/swarm-agent/agent/rules/network.yaml"
    assert (scratch / os.readlink(link).lstrip("/")).is_file(), "the default rules resolve to /etc"

    # The launcher's code imports and runs from where it was installed.
    launcher = (scratch / binary.lstrip("/")).read_text()
    assert launcher.startswith("#!/usr/bin/python3")
    lib = re.search(r'sys\.path\.insert\(0, "([^"]+)"\)', launcher).group(1)
    out = run("/usr/bin/python3", "-I", "-c",
              f"import sys; sys.path.insert(0, {str(scratch) + lib!r}); "
              "import agent; assert agent.__file__.startswith(sys.path[0]), agent.__file__; "
              "from agent.cli.main import main; main(['--version'])")
    assert out.strip() == f"swarm-agent {VERSION}"


def test_unit_exposure_within_budget():
    if shutil.which("systemd-analyze") is None:
        skip_unsupported("needs systemd-analyze")
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert float(m.group(1)) <= EXPOSURE_BUDGET


def test_unit_verifies_without_warnings(tmp_path):
    """`systemd-analyze verify` only warns (exit 0) on unknown keys or bad values, which
    systemd then ignores: a typo would silently drop a sandbox setting. ExecStart points at
    /bin/true because the agent is not installed on the test host."""
    if shutil.which("systemd-analyze") is None:
        skip_unsupported("needs systemd-analyze")
    unit = tmp_path / "swarm-agent.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/swarm-agent", "ExecStart=/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# ---- swarm-mesh
MESH_UNIT = REPO / "packaging" / "swarm-mesh.service"
MESH_EXPOSURE_BUDGET = 1.1    # packaging/README.md records the score


@pytest.fixture(scope="module")
def mesh_rpm() -> Path:
    if shutil.which("rpmbuild") is None:
        skip_unsupported("needs rpmbuild (apt-get install rpm; install.sh --test does)")
    out = run(str(REPO / "packaging" / "build.sh"), "mesh-rpm", timeout=600)
    rpm = REPO / out.strip().splitlines()[-1]
    assert rpm.name == f"swarm-mesh-{VERSION}-1.x86_64.rpm", rpm.name
    return rpm


def mesh_needs() -> list[str]:
    """The agent files the mesh imports, as packaging/mesh_imports.py finds them."""
    return run("python3", str(REPO / "packaging" / "mesh_imports.py"), str(REPO)).split()


def test_mesh_rpm_carries_the_mesh_and_only_the_agent_modules_it_imports(mesh_rpm):
    files = set(run("rpm", "-qp", "--list", str(mesh_rpm)).split())
    lib = "/usr/lib/swarm-mesh"
    expected = {f"{lib}/mesh/{p.name}" for p in (REPO / "mesh").glob("*.py")}
    expected |= {f"{lib}/{p}" for p in mesh_needs()}
    assert {f"{lib}/agent/fleet/decision.py", f"{lib}/agent/_vendor/nats/__init__.py",
            f"{lib}/agent/proto/swarm/mesh/v1/mesh_pb2.py"} <= expected
    assert expected - files == set()
    shipped_agent = {f for f in files if f.startswith(f"{lib}/agent/") and f.endswith(".py")}
    assert shipped_agent <= expected, "only what the mesh imports"
    assert f"{lib}/agent/daemon.py" not in files and not any("/probes/" in f for f in files)
    assert {"/usr/bin/swarm-mesh", "/usr/lib/systemd/system/swarm-mesh.service",
            "/etc/swarm-mesh", "/var/lib/swarm-mesh"} <= files
    owners = run("rpm", "-qp", "--qf", r"[%{FILENAMES} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEMODES:perms}\n]",
                 str(mesh_rpm))
    assert "/etc/swarm-mesh root:swarm-mesh drwxr-x---" in owners
    assert "/var/lib/swarm-mesh swarm-mesh:swarm-mesh drwx------" in owners

    declared = {"required": set(), "pre": set(), "recommends": set()}
    for line in (REPO / "packaging" / "mesh-dependencies").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            cols = [c.strip() for c in line.split("|")] + [""]
            declared[cols[2] or "required"].add(cols[1])
    requires = {r.strip() for r in run("rpm", "-qp", "--requires", str(mesh_rpm)).splitlines()}
    assert {r for r in requires if not r.startswith("rpmlib(") and r != "/bin/sh"} == \
        declared["required"] | declared["pre"]
    assert set(run("rpm", "-qp", "--recommends", str(mesh_rpm)).split("\n")) - {""} == \
        declared["recommends"] == {"python3-psycopg2"}
    assert "swarm-agent" not in " ".join(requires), "the mesh host runs no agent daemon"

    scripts = run("rpm", "-qp", "--scripts", str(mesh_rpm))
    assert "useradd -r -g swarm-mesh" in scripts
    assert "swarm-mesh init" not in scripts.replace('echo "  swarm-mesh init', ""), \
        "no keys are made at install"


def test_mesh_rpm_launcher_runs_from_the_installed_tree(mesh_rpm, tmp_path):
    """Every mesh module imports from the installed tree alone (python3 -I: no checkout on
    the path), and the launcher answers --help and --version."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run("rpm", "--root", str(scratch), "--initdb")
    run("rpm", "--root", str(scratch), "-i", "--nodeps", "--noscripts", str(mesh_rpm))
    lib = scratch / "usr/lib/swarm-mesh"
    exec_start = re.findall(r"^ExecStart=(.*)$", MESH_UNIT.read_text(), re.M)[0].split()
    launcher = scratch / exec_start[0].lstrip("/")
    text = launcher.read_text()
    assert text.startswith("#!/usr/bin/python3 -I\n") and '"/usr/lib/swarm-mesh"' in text
    relocated = tmp_path / "swarm-mesh"
    relocated.write_text(text.replace('"/usr/lib/swarm-mesh"', repr(str(lib))))
    modules = sorted(f"mesh.{p.stem}" for p in (lib / "mesh").glob("*.py") if p.stem != "__main__")
    run("/usr/bin/python3", "-I", "-c",
        f"import sys, importlib; sys.path.insert(0, {str(lib)!r}); "
        f"[importlib.import_module(m) for m in {modules!r}]; import agent, mesh; "
        "assert agent.__file__.startswith(sys.path[0]) and mesh.__file__.startswith(sys.path[0])")
    assert "init" in run("/usr/bin/python3", "-I", str(relocated), "--help")
    assert run("/usr/bin/python3", "-I", str(relocated), "--version").strip() == f"swarm-mesh {VERSION}"


def test_mesh_unit_verifies_and_stays_within_its_exposure_budget(tmp_path):
    if shutil.which("systemd-analyze") is None:
        skip_unsupported("needs systemd-analyze")
    unit = tmp_path / "swarm-mesh.service"
    unit.write_text(MESH_UNIT.read_text().replace("ExecStart=/usr/bin/swarm-mesh", "ExecStart=/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(MESH_UNIT)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert float(m.group(1)) <= MESH_EXPOSURE_BUDGET, proc.stdout
