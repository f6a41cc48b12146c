"""Config and rule files against what the kernel and the code can take: declared bounds
for every numeric key, and files refused before they are parsed (too large, not text) or
as they are (duplicate keys, nesting, alias bombs, numbers that are not finite)."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from agent import config, configcheck, yamlsafe
from agent.config import ConfigError
from agent.detect.rules import RuleError, load_rules


def numeric_keys(cls: type = config.Config, prefix: str = "") -> dict[str, type]:
    """Every int/float key of the config tree, dotted, with its type."""
    out: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(hint):
            out.update(numeric_keys(hint, key + "."))
        elif str(hint).startswith(("int", "float")) or hint in (int, float):
            out[key] = int if "int" in str(hint) and "float" not in str(hint) else float
    return out


def _get(cfg: config.Config, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _load(tmp_path: Path, text: str | bytes) -> config.Config:
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return config.load(path)


def test_every_numeric_key_has_a_declared_bound():
    # A key added to a dataclass without a line in configcheck.BOUNDS fails here.
    missing = sorted(set(numeric_keys()) - set(configcheck.BOUNDS))
    assert not missing, f"declare bounds in agent/configcheck.py BOUNDS for: {missing}"
    assert not set(configcheck.BOUNDS) - set(numeric_keys()), "bounds for keys that do not exist"


def _dump(values: dict[str, object]) -> str:
    tree: dict = {}
    for key, value in values.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return yaml.safe_dump(tree)


@pytest.mark.parametrize("key", sorted(configcheck.BOUNDS))
def test_bounds_hold_at_their_edges(tmp_path, key):
    b, kind = configcheck.BOUNDS[key], numeric_keys()[key]
    default = _get(config.Config(), key)
    assert default is None or (default > b.low if b.above else default >= b.low) and default <= b.high
    high = int(b.high) if kind is int else float(b.high)
    # the highest value is taken (with the keys that must not be below it at theirs)
    roomy = {"mitigation.max_ttl_s": configcheck.YEAR_S, "mesh.outbox_hard_max": 10_000_000}
    assert _get(_load(tmp_path, _dump({**roomy, key: high})), key) == high
    for bad in (high + 1, b.low if b.above else b.low - 1, math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError) as err:
            _load(tmp_path, _dump({key: bad}))
        msg = str(err.value)
        assert key in msg and "\n" not in msg, msg


@pytest.mark.parametrize("text, message", [
    ("enforce:\n  set_size: 5000000000\n",
     "enforce.set_size must be greater than 0 and at most 16777216 (got 5000000000"),
    ("probes:\n  map_entries: 4000000000\n",
     "probes.map_entries must be at least 1024 and at most 1048576 (got 4000000000"),
    ("mitigation:\n  default_ttl_s: .nan\n",
     "mitigation.default_ttl_s must be a finite number (got nan)"),
    ("mesh:\n  heartbeat_s: 1.0e+999\n", "mesh.heartbeat_s must be a finite number (got inf)"),
    ("mesh:\n  heartbeat_s: 1e9\n", "mesh.heartbeat_s must be a number (YAML reads '1e9' as text"),
    ("mesh:\n  heartbeat_s: nan\n", "mesh.heartbeat_s must be a number"),
    ("enforce:\n  set_size: 1\nprobes: {}\nenforce:\n  set_size: 2\n",
     "key 'enforce' given twice (first at line 1) (line 4, column 1)"),
    ("alerts:\n  labels: {team: a, team: b}\n", "key 'team' given twice (first at line 2)"),
    ("state_dir: \"/var/lib/\\0x\"\n", "state_dir holds a character that is not printable ('\\x00')"),
    ("alerts:\n  labels: {team: \"a\\e[31m\"}\n", "alerts.labels.team holds a character that is not printable ('\\x1b')"),
    ("metrics:\n  listen: '127.0.0.1:\u00b2'\n", "metrics.listen: '127.0.0.1:\u00b2' is not host:port"),
    ("mesh:\n  batch_size: " + "9" * 60 + "\n", "an integer of 60 digits (at most 40)"),
    ("a: 2001-13-45\n", "cannot read '2001-13-45': month must be in 1..12 (line 1, column 4)"),
    ("rules_file: /" + "a" * 300 + "\n", "does not exist"),
    ("interfaces: [" + ", ".join(["eth0"] * 10_001) + "]\n", "interfaces has 10001 entries"),
    ("a: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
    ("a: &a [*a]\n", "is nested more than 32 levels deep (a recursive alias?)"),
    (b"state_dir: /x\n\xff\xfe\n", "is not UTF-8 text (invalid byte at offset 14)"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "is not text (a NUL byte at offset 7)"),
])
def test_hostile_config_is_one_sentence(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_power_of_two_and_undeclared_keys():
    ring = configcheck.Bound(4096, 1 << 30, pow2=True)
    configcheck.BOUNDS["test.ring_bytes"] = ring
    try:
        assert configcheck.number("test.ring_bytes", 1 << 20, True) == 1 << 20
        with pytest.raises(ValueError, match="test.ring_bytes must be a power of two"):
            configcheck.number("test.ring_bytes", 5000, True)
    finally:
        del configcheck.BOUNDS["test.ring_bytes"]
    # a key without a declared bound still gets a finite, 64-bit range
    assert configcheck.number("test.other", 2**63 - 1, True) == 2**63 - 1
    with pytest.raises(ValueError, match="at most 9223372036854775807"):
        configcheck.number("test.other", 2**63, True)
    with pytest.raises(ValueError, match="must be a finite number"):
        configcheck.number("test.other", math.inf, False)


def test_merge_keys_are_not_duplicates(tmp_path):
    cfg = _load(tmp_path, "enforce:\n  rate_limit:\n    <<: {packets_per_second: 5, burst: 10}\n"
                "    burst: 20\n")
    assert cfg.enforce.rate_limit == config.RateLimit(packets_per_second=5, burst=20)


def _laughs(levels: int = 9) -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nbreach:\n  shells: *l{levels - 1}\n"


def test_big_and_bombs_are_refused_quickly(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:          # 50 MiB, sparse: refused on its size, never read
        f.truncate(50 << 20)
    t0 = time.process_time()   # CPU time: robust to a busy machine
    with pytest.raises(ConfigError, match=r"is 52428800 bytes; at most 1 MiB is read"):
        config.load(big)
    with pytest.raises(ConfigError, match="more than 100000 values once its aliases"):
        _load(tmp_path, _laughs())
    big.write_text("interfaces: [" + ",".join(["a"] * 500_000) + "]\n")   # 1 MiB of values
    with pytest.raises(ConfigError, match=r"more than 100000 values \(line 1, column"):
        config.load(big)
    assert time.process_time() - t0 < 3.0


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)                     # no writer: opening it must not hang
    with pytest.raises(ConfigError, match="is not a regular file"):
        config.load(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        config.load("/dev/zero")
    with pytest.raises(ConfigError, match="cannot read config .*: Is a directory"):
        config.load(tmp_path)


RULE = ("rules:\n- id: net.t\n  version: {version}\n  class: system_attack\n  severity: high\n"
        "  event: net.source\n  thresholds: {{{name}: {value}}}\n  action: block\n"
        "  ttl_s: {ttl}\n")


@pytest.mark.parametrize("fields, message", [
    (dict(value=".nan"), "rules[0].thresholds.syns_per_s must be a finite number (got nan)"),
    (dict(value="1.0e+400"), "must be a finite number (got inf)"),
    (dict(value="5000000000"), "threshold syns_per_s must be greater than 0 and at most 1000000000"),
    (dict(name="ports", value="70000"), "threshold ports must be greater than 0 and at most 65536"),
    (dict(ttl="315360000"), "ttl_s must be a number greater than 0 and at most 31536000"),
    (dict(ttl="-.inf"), "rules[0].ttl_s must be a finite number"),
    (dict(version=str(2**70)), "version must be a positive integer (at most 1000000)"),
])
def test_hostile_rules_are_one_sentence(tmp_path, fields, message):
    path = tmp_path / "r.yaml"
    path.write_text(RULE.format(**{"version": 1, "name": "syns_per_s", "value": 100,
                                   "ttl": 60, **fields}))
    with pytest.raises(RuleError) as err:
        load_rules(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rules_files_get_the_same_reader(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RULE.format(version=1, name="syns_per_s", value=100, ttl=60))
    assert [r.name for r in load_rules(path)] == ["net.t@1"]
    path.write_text(RULE.format(version=1, name="syns_per_s", value=100, ttl=60) + "rules: []\n")
    with pytest.raises(RuleError, match="key 'rules' given twice"):
        load_rules(path)
    path.write_bytes(b"\xc3\x28rules: []\n")
    with pytest.raises(RuleError, match="is not UTF-8 text"):
        load_rules(path)
    path.write_text(_laughs().replace("breach:\n  shells:", "rules:"))
    with pytest.raises(RuleError, match="more than 100000 values"):
        load_rules(path)
    path.write_bytes(b"rules: []\n" + b"#" * yamlsafe.MiB)
    with pytest.raises(RuleError, match="at most 1 MiB is read"):
        load_rules(path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("content, code", [
    (None, 0),                                   # packaging/config.yaml
    (b"\x00\x01binary\xff" * 100, 2),
    (b"mitigation:\n  default_ttl_s: .nan\n", 2),
    (b"enforce:\n  set_size: 5000000000\n", 2),
    (b"probes: {}\nprobes: {}\n", 2),
])
def test_check_config_command(tmp_path, content, code):
    path = Path(__file__).resolve().parents[2] / "packaging" / "config.yaml"
    if content is not None:
        path = tmp_path / "c.yaml"
        path.write_bytes(content)
    proc = _cli("check-config", "--config", str(path))
    assert proc.returncode == code, proc.stderr
    lines = (proc.stdout if code == 0 else proc.stderr).splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("config " if code == 0 else "swarm-agent: ")
