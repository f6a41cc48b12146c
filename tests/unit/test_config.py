"""Config validation: one clear sentence, exit code 2, nothing applied."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config
from agent.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_example_config_is_the_defaults():
    # packaging/config.yaml documents the defaults; this keeps it true to the code.
    assert config.load(REPO / "packaging" / "config.yaml") == config.Config()


@pytest.mark.parametrize("text, message", [
    ("colour: blue\n", "unknown config key colour"),
    ("allowlist:\n  mesh: [10.0.0.0/33]\n", "allowlist.mesh: '10.0.0.0/33' is not an IP address or CIDR"),
    ("allowlist:\n  managment: []\n", "unknown config key allowlist.managment"),
    ("mitigation:\n  default_ttl_s: -5\n", "mitigation.default_ttl_s must be greater than 0"),
    ("enforce:\n  rate_limit:\n    packets_per_second: 0\n", "enforce.rate_limit.packets_per_second must be greater than 0"),
    ("probes:\n  window_ms: ten\n", "probes.window_ms must be an integer"),
    ("probes:\n  process_owners: run/owners\n", "probes.process_owners must be an absolute path"),
    ("dry_run: maybe\n", "dry_run must be true or false"),
    ("enforce:\n  reroute:\n    sinkhole_v4: '2001:db8::1'\n", "enforce.reroute.sinkhole_v4"),
    ("interfaces: eth0\n", "interfaces must be a list of strings"),
    ("- a\n- b\n", "must be a mapping"),
    ("a: [\n", "not valid YAML"),
    # comm names are the process's to set: old comm lists are refused, never guessed
    ("breach:\n  service_comms: [nginx]\n",
     "breach.service_comms is no longer read (process names can be forged): list the "
     "executables' paths in breach.services instead"),
    ("breach:\n  package_managers: [dpkg]\n",
     "breach.package_managers: 'dpkg' is not an executable path (write e.g. /usr/bin/dpkg"),
    ("breach:\n  shells: [/usr/bin/bash, sh]\n", "breach.shells: 'sh' is not an executable path"),
    ("breach:\n  host_root: host\n", "breach.host_root: 'host' is not an absolute path"),
    ("breach:\n  credential_paths: ['*authorized_keys']\n",
     "a suffix pattern names a directory and a file in it"),
])
def test_invalid_config_is_one_clear_sentence(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        config.load(path)
    assert message in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(tmp_path / "nope.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nmitigation:\n  max_sources_per_rule: -1\n")
    proc = _cli("run", "--config", str(path))
    assert proc.returncode == 2
    assert "mitigation.max_sources_per_rule must be greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state").exists()   # nothing applied, not even the state dir


@pytest.mark.privileged
def test_cli_missing_interface_exits_2_and_applies_nothing(tmp_path, lab):
    path = tmp_path / "c.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\ninterfaces: [v0, nosuch0]\n")
    proc = subprocess.run(["ip", "netns", "exec", lab.victim, sys.executable, "-m", "agent.cli.main",
                           "run", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "no interface named 'nosuch0'" in proc.stderr
    assert "Traceback" not in proc.stderr
    tables = subprocess.run(["ip", "netns", "exec", lab.victim, "nft", "list", "tables"],
                            capture_output=True, text=True).stdout
    assert "swarm_agent" not in tables


@pytest.mark.parametrize("key", ["remote_access", "service_managers"])
def test_executable_lists_need_absolute_paths(tmp_path, key):
    path = tmp_path / "c.yaml"
    path.write_text(f"breach:\n  {key}: [sshd]\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"breach.{key}: 'sshd' is not an executable path (write "
                                     "e.g. /usr/bin/sshd")
