"""Generated configs and rule files, of the right and the wrong shapes, through the real
loaders: every one is accepted within the declared bounds, or refused with one printable
sentence (ConfigError / RuleError; exit 2 from the CLI), never a traceback.

The bulk runs in-process (config.load, load_rules); a handful goes through the real
`swarm-agent check-config` and `swarm-agent run` commands in a subprocess.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import yaml

from hypothesis import HealthCheck, given, settings  # install.sh --test, the [test] extra
from hypothesis import strategies as st

from agent import config, configcheck  # noqa: E402
from agent.config import ConfigError  # noqa: E402
from agent.detect.rules import RuleError, kernel_thresholds, load_rules  # noqa: E402
from agent.enforce import ruleset  # noqa: E402
from agent.respond.policy import lifetime_s  # noqa: E402
from agent.sources.net import window_thresholds  # noqa: E402

SETTINGS = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

TEXTS = st.sampled_from([
    "", "/", "/tmp", "/usr/bin/bash", "/etc/shadow*", "*/.ssh/authorized_keys", "eth0", "lo",
    "127.0.0.1:9464", "[::1]:0", "h:\u00b2", "10.0.0.0/8", "fd00::/64", "::ffff:1.2.3.4",
    "info", "debug", "http://127.0.0.1:9093", "security_breach", "team", "a\x00b", "\x1b[2J",
    "a\nb", "\u202e", "\ud800", "x" * 5000, "/" + "a" * 300])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 2**64, 10**40, 10**41]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), TEXTS,
    st.binary(max_size=8))
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                   | st.dictionaries(st.one_of(st.text(max_size=6), SCALARS), inner, max_size=4),
                   max_leaves=12)


def _right(hint: typing.Any, key: str) -> st.SearchStrategy:
    """Values of about the right type for `key` (edges of its bounds included)."""
    text = str(hint)
    b = configcheck.BOUNDS.get(key)
    if b is not None:
        low, high = int(max(b.low, -1e18)), int(min(b.high, 1e18))
        edges = st.sampled_from([low, high, low - 1, high + 1, (low + high) // 2])
        if "float" in text:
            return st.one_of(edges, st.floats(b.low, b.high), st.floats())
        return st.one_of(edges, st.integers(low - 2, high + 2))
    if text.startswith("tuple"):
        return st.lists(st.one_of(TEXTS, st.text(max_size=10)), max_size=5)
    if typing.get_origin(hint) is dict:
        return st.dictionaries(st.one_of(TEXTS, st.text(max_size=6)),
                               st.one_of(TEXTS, st.dictionaries(TEXTS, TEXTS, max_size=2)),
                               max_size=3)
    if hint is bool:
        return st.booleans()
    return TEXTS


def _shaped(cls: type, prefix: str = "") -> st.SearchStrategy:
    """A mapping with some of `cls`'s keys, each of the right or the wrong shape."""
    hints = typing.get_type_hints(cls)
    optional = {}
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], prefix + f.name
        right = _shaped(hint, key + ".") if dataclasses.is_dataclass(hint) else _right(hint, key)
        optional[f.name] = st.one_of(right, right, right, ANY)
    return st.fixed_dictionaries({}, optional=optional)


def _leaves(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, typing.Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(_leaves(hint, prefix + f.name + "."))
        else:
            out[prefix + f.name] = hint
    return out


LEAVES = _leaves(config.Config)


def _tree(pairs: list[tuple[str, typing.Any]]) -> dict:
    tree: dict = {}
    for key, value in pairs:
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = value
    return tree


# A few keys changed from the (valid) defaults: reaches every key with every kind of value
# in a config that is otherwise accepted.
FEW_KEYS = st.lists(st.sampled_from(sorted(LEAVES)).flatmap(
    lambda k: st.tuples(st.just(k), st.one_of(_right(LEAVES[k], k), SCALARS))),
    min_size=1, max_size=3).map(_tree)
CONFIGS = st.one_of(FEW_KEYS, FEW_KEYS, _shaped(config.Config), ANY)


def _refused_well(err: ValueError) -> None:
    msg = str(err)
    assert msg and msg.isprintable(), msg     # one line: no newline, no escape, no NUL


def _check_config(path: Path) -> None:
    try:
        cfg = config.load(path)
    except ConfigError as e:
        _refused_well(e)
        return
    for key, b in configcheck.BOUNDS.items():   # accepted: within bounds, and usable
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value is None or (math.isfinite(value) and b.low <= value <= b.high), key
    batch = json.dumps(ruleset.table_batch(cfg, {}, 0.0))     # the nftables table builds
    assert "NaN" not in batch and "Infinity" not in batch
    pol = cfg.mitigation                                     # the longest ttl is finite
    assert lifetime_s(pol.max_ttl_s, 10**6, pol) <= pol.max_ttl_s
    assert_fits_the_kernel(PACKAGED, cfg.probes.window_ms)


def assert_fits_the_kernel(per_s: dict[str, int], window_ms: int) -> None:
    """Each per-window threshold is below 2**64 before it is packed, and the u64 field
    holds it unchanged (ctypes would wrap a larger value silently)."""
    t = window_thresholds(per_s, window_ms)
    for key in ("syns", "packets", "udp", "conns", "resets", "svc_syns", "svc_packets",
                "svc_udp"):
        value = int(per_s.get(key, 0))
        want = max(1, math.ceil(value * window_ms / 1000)) if value else 0
        assert want < 2**64 and getattr(t, key) == want, key


PACKAGED = kernel_thresholds(load_rules())
SCRATCH = Path(tempfile.mkdtemp(prefix="config-property-"))   # one file, rewritten
atexit.register(shutil.rmtree, SCRATCH, True)


def _dump(data: typing.Any) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True).encode("utf-8", "surrogatepass")


@SETTINGS
@given(data=CONFIGS, tail=st.one_of(st.just(b""), st.binary(max_size=16),
                                    st.sampled_from([b"\nprobes: {}\nprobes: {}\n",
                                                     b"\nx: &a [*a]\n", b"\x00", b"\xff"])))
def test_generated_configs(data, tail):
    path = SCRATCH / "c.yaml"
    path.write_bytes(_dump(data) + tail)
    _check_config(path)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_random_bytes_as_config(raw):
    path = SCRATCH / "c.yaml"
    path.write_bytes(raw)
    _check_config(path)


RULE_KEYS = ["id", "version", "class", "severity", "event", "thresholds", "match", "action",
             "ttl_s", "exempt", "description", "scope", "where"]
RULE_VALUES = {
    "id": st.sampled_from(["net.t", "breach.t", "x", ""]),
    "version": st.one_of(st.integers(-2, 3), st.sampled_from([10**6, 10**6 + 1, 2**64])),
    "class": st.sampled_from(["system_attack", "security_breach", "nope"]),
    "severity": st.sampled_from(["low", "medium", "high", "critical", "x"]),
    "event": st.sampled_from(["net.source", "net.service", "tcp.established", "proc.exec",
                              "nope"]),
    "thresholds": st.dictionaries(
        st.sampled_from(["syns_per_s", "packets_per_s", "ports", "sources", "conns_per_s"]),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 2**70)),
        max_size=3),
    "action": st.sampled_from(["block", "rate_limit", "rate_limit_service", "isolate", "report"]),
    "ttl_s": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-1, 2**40)),
    "exempt": st.lists(st.sampled_from(["management", "mesh", "x"]), max_size=2),
    "scope": st.sampled_from(["node", "service", "x"]),
}
RULES = st.fixed_dictionaries({"rules": st.lists(st.fixed_dictionaries(
    {k: st.one_of(RULE_VALUES[k], RULE_VALUES[k], RULE_VALUES[k], ANY)
     for k in ("id", "version", "class", "severity", "action")},
    optional={k: st.one_of(RULE_VALUES.get(k, ANY), ANY) for k in RULE_KEYS
              if k not in ("id", "version", "class", "severity", "action")}), max_size=3)})


@SETTINGS
@given(data=st.one_of(RULES, RULES, ANY), tail=st.sampled_from([b"", b"\x00", b"\xc3("]))
def test_generated_rule_files(data, tail):
    path = SCRATCH / "r.yaml"
    path.write_bytes(_dump(data) + tail)
    try:
        rules = load_rules(path)
    except RuleError as e:
        _refused_well(e)
        return
    for cfg_window in (10, 60_000):   # the kernel's thresholds fit its u64 fields
        assert_fits_the_kernel(kernel_thresholds(rules), cfg_window)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *args],
                          capture_output=True, text=True, timeout=60)


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=CONFIGS, poison=st.sampled_from([
    b"\nmitigation: {default_ttl_s: .nan}\n", b"\nenforce: {set_size: 5000000000}\n",
    b"\x00binary", b"\nprobes: {}\nprobes: {}\n"]))
def test_real_commands_exit_0_or_2_with_one_line(tmp_path_factory, data, poison):
    path = tmp_path_factory.mktemp("cli") / "c.yaml"
    path.write_bytes(_dump(data))
    proc = _cli("check-config", "--config", str(path))
    assert proc.returncode in (0, 2), proc.stderr
    out = proc.stdout if proc.returncode == 0 else proc.stderr
    assert len(out.splitlines()) == 1 and "Traceback" not in proc.stderr, out
    if os.geteuid() != 0:
        return             # `run` refuses non-root before it reads the config
    # `run` with a config that cannot be valid: exit 2 before anything is applied
    state = path.parent / "state"
    path.write_bytes(f"state_dir: {state}\n".encode() + poison)
    proc = _cli("run", "--config", str(path))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("swarm-agent: ") and not state.exists()
