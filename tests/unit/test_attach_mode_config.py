"""probes.attach_mode: the four hooks the config may name, anything else refused in one
sentence (exit 2 from check-config), and the order each asks the loader to try."""
from __future__ import annotations

import subprocess
import sys

import pytest

from agent import config
from agent.config import ConfigError
from agent.sources import ingress
from agent.sources.ingress import Mode


def _load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return config.load(path)


@pytest.mark.parametrize("mode", config.ATTACH_MODES)
def test_each_mode_is_accepted(tmp_path, mode):
    assert _load(tmp_path, f"probes:\n  attach_mode: {mode}\n").probes.attach_mode == mode


def test_the_default_is_auto(tmp_path):
    assert _load(tmp_path, "probes: {}\n").probes.attach_mode == "auto"


@pytest.mark.parametrize("value, shown", [
    ("xdp", "'xdp'"), ("Native", "'Native'"), ("''", "''"), ("1", None), ("[tc]", None),
    ("\"tc\\e[31m\"", None)])
def test_anything_else_is_one_sentence(tmp_path, value, shown):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, f"probes:\n  attach_mode: {value}\n")
    msg = str(err.value)
    assert msg.startswith("probes.attach_mode") and "\n" not in msg, msg
    if shown is not None:
        assert msg == f"probes.attach_mode must be one of auto, native, tc, generic (got {shown})"


def test_check_config_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("probes:\n  attach_mode: offload\n")
    proc = subprocess.run([sys.executable, "-m", "agent.cli.main", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "swarm-agent: probes.attach_mode must be one of auto, native, tc, generic (got 'offload')"]


@pytest.mark.parametrize("configured, driver, order", [
    ("auto", "veth", [Mode.TC, Mode.NATIVE, Mode.GENERIC]),
    ("auto", "ixgbe", [Mode.NATIVE, Mode.TC, Mode.GENERIC]),
    ("auto", None, [Mode.NATIVE, Mode.TC, Mode.GENERIC]),
    ("native", "veth", [Mode.NATIVE, Mode.TC, Mode.GENERIC]),
    ("generic", "veth", [Mode.GENERIC, Mode.TC, Mode.NATIVE]),
    ("tc", "mlx5_core", [Mode.TC, Mode.NATIVE, Mode.GENERIC]),
])
def test_order_puts_the_configured_hook_first_then_the_cheapest(configured, driver, order):
    assert ingress.order(configured, driver) == order
