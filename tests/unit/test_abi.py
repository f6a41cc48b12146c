"""The kernel/user ABI: the ctypes mirror in agent/sources/abi.py must match the C structs
of probes/include/events.h exactly (size, field names, offsets, field sizes), as recorded
in the BTF of abi.bpf.o; program and map names must exist in net.bpf.o."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.sources import abi
from tests.conftest import skip_unsupported

REPO = Path(__file__).resolve().parents[2]


def _btf(obj: Path) -> dict[int, dict]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj), "format", "raw"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


@pytest.fixture(scope="module")
def built() -> None:
    """Builds the probes (a no-op when up to date); needs clang and bpftool."""
    for tool in ("clang", "bpftool", "make"):
        if shutil.which(tool) is None:
            skip_unsupported(f"building probes needs {tool}")
    subprocess.run(["make", "-s", "-C", str(REPO / "probes")], check=True, timeout=300)


def _size(types: dict[int, dict], type_id: int) -> int:
    t = types[type_id]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
        t = types[t["type_id"]]
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * _size(types, t["type_id"])
    return t["size"]


def _c_layout(types: dict[int, dict], name: str) -> tuple[int, list[tuple[str, int, int]]]:
    found = [t for t in types.values() if t["kind"] == "STRUCT" and t["name"] == name]
    assert found, f"struct {name} missing from abi.bpf.o BTF (add a global to abi.bpf.c)"
    t = found[0]
    return t["size"], [(m["name"], m["bits_offset"] // 8, _size(types, m["type_id"]))
                       for m in t["members"]]


def _py_layout(cls: type[ctypes.Structure]) -> tuple[int, list[tuple[str, int, int]]]:
    return ctypes.sizeof(cls), [(name, getattr(cls, name).offset, getattr(cls, name).size)
                                for name, *_ in cls._fields_]


@pytest.mark.parametrize("cls", abi.SHARED_STRUCTS, ids=lambda c: c.__name__)
def test_struct_matches_c(built, cls):
    assert _py_layout(cls) == _c_layout(_btf(abi.ABI_OBJECT), cls.__name__)


def test_every_c_struct_is_mirrored(built):
    c_names = {t["name"] for t in _btf(abi.ABI_OBJECT).values() if t["kind"] == "STRUCT"}
    assert c_names == {c.__name__ for c in abi.SHARED_STRUCTS}


def test_decoders_cover_every_kind():
    assert set(abi.DECODERS) == set(abi.EventKind)
    for kind, cls in abi.DECODERS.items():
        assert cls._fields_[0] == ("hdr", abi.event_header), kind


def _datasec_vars(types: dict[int, dict], section: str) -> dict[str, dict]:
    sec = [t for t in types.values() if t["kind"] == "DATASEC" and t["name"] == section]
    assert sec, f"no {section} in net.bpf.o"
    return {types[v["type_id"]]["name"]: {**v, "var": types[v["type_id"]]} for v in sec[0]["vars"]}


def test_program_and_map_names(built):
    types = _btf(abi.NET_OBJECT)
    funcs = {t["name"] for t in types.values() if t["kind"] == "FUNC" and t["linkage"] == "global"}
    assert {p.value for p in abi.NetProg} <= funcs
    maps = _datasec_vars(types, ".maps")
    assert {m.value for m in abi.NetMap if m is not abi.NetMap.RODATA} == set(maps)


def test_rodata_holds_only_net_config(built):
    types = _btf(abi.NET_OBJECT)
    rodata = _datasec_vars(types, ".rodata")
    assert list(rodata) == [abi.RODATA_VAR]
    var = rodata[abi.RODATA_VAR]
    assert var["offset"] == 0 and var["size"] == ctypes.sizeof(abi.net_config)


def test_decode_roundtrip():
    ev = abi.tcp_remote_event(count=7, dport=80)
    ev.hdr.kind, ev.hdr.size = abi.EventKind.TCP_RESET, ctypes.sizeof(ev)
    got = abi.decode(bytes(ev))
    assert isinstance(got, abi.tcp_remote_event) and got.count == 7 and got.dport == 80
    assert abi.decode(bytes(ev)[:20]) is None
    ev.hdr.kind = 99
    assert abi.decode(bytes(ev)) is None


def test_proc_program_and_map_names(built):
    types = _btf(abi.PROC_OBJECT)
    funcs = {t["name"] for t in types.values() if t["kind"] == "FUNC" and t["linkage"] == "global"}
    assert {p.value for p in abi.ProcProg} == funcs
    assert set(abi.PROC_TRACEPOINTS) == set(abi.ProcProg)
    maps = _datasec_vars(types, ".maps")
    assert {m.value for m in abi.ProcMap if m is not abi.ProcMap.RODATA} == set(maps)


def test_proc_rodata_holds_only_proc_config(built):
    rodata = _datasec_vars(_btf(abi.PROC_OBJECT), ".rodata")
    assert list(rodata) == [abi.PROC_RODATA_VAR]
    var = rodata[abi.PROC_RODATA_VAR]
    assert var["offset"] == 0 and var["size"] == ctypes.sizeof(abi.proc_config)


def test_parse_failures_match_c(built):
    enums = [t for t in _btf(abi.ABI_OBJECT).values() if t["kind"] == "ENUM" and t["name"] == "parse_failure"]
    assert enums, "enum parse_failure missing from abi.bpf.o BTF"
    assert {v["name"]: v["val"] for v in enums[0]["values"]} == {
        f"PARSE_{r.name}": r.value for r in abi.ParseFailure}
    assert abi.PARSE_FAILURES == max(abi.ParseFailure) + 1


def test_activity_program_and_map_names(built):
    types = _btf(abi.ACTIVITY_OBJECT)
    funcs = {t["name"] for t in types.values() if t["kind"] == "FUNC" and t["linkage"] == "global"}
    assert {p.value for p in abi.ActivityProg} == funcs
    assert set(abi.ACTIVITY_TRACEPOINTS) == set(abi.ActivityProg)
    maps = _datasec_vars(types, ".maps")
    assert {m.value for m in abi.ActivityMap if m is not abi.ActivityMap.RODATA} == set(maps)
    rodata = _datasec_vars(types, ".rodata")
    assert list(rodata) == [abi.ACTIVITY_RODATA_VAR]
    var = rodata[abi.ACTIVITY_RODATA_VAR]
    assert var["offset"] == 0 and var["size"] == ctypes.sizeof(abi.activity_config)


def test_flow_outcomes_match_c(built):
    enums = [t for t in _btf(abi.ABI_OBJECT).values()
             if t["kind"] == "ENUM" and t["name"] == "flow_outcome"]
    assert enums, "enum flow_outcome missing from abi.bpf.o BTF"
    assert {v["name"]: v["val"] for v in enums[0]["values"]} == {
        f"FLOW_{o.name}": o.value for o in abi.FlowOutcome}


def test_activity_caps_match_c(built):
    enums = [t for t in _btf(abi.ABI_OBJECT).values()
             if t["kind"] == "ENUM" and t["name"] == "activity_cap"]
    assert enums, "enum activity_cap missing from abi.bpf.o BTF"
    assert {v["name"]: v["val"] for v in enums[0]["values"]} == {
        f"CAP_{c.name}": c.value for c in abi.ActivityCap}
    assert abi.ACTIVITY_CAPS == len(abi.ActivityCap)
