"""The committed generated code (agent/proto/) matches what `make -C proto` produces now."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import skip_unsupported

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "agent" / "proto"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.py"))
            if "__pycache__" not in p.parts}


def test_generated_code_is_current(tmp_path):
    # In CI both come from install.sh --test: a skip there would hide a stale proto.
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        skip_unsupported("grpcio-tools (the [test] extra) is not installed")
    if shutil.which("make") is None:
        skip_unsupported("needs make")
    out = tmp_path / "gen"
    done = subprocess.run(["make", "-s", "-C", str(REPO / "proto"), f"OUT={out}",
                           f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fresh, committed = _tree(out), _tree(GENERATED)
    assert sorted(fresh) == sorted(committed), "files differ: run `make -C proto` and commit"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make -C proto` and commit"


def test_generated_code_imports_on_this_runtime():
    # The committed code must load on Debian's grpcio/protobuf without the generator.
    from agent.proto.swarm.control.v1 import control_pb2, control_pb2_grpc

    req = control_pb2.ApplyMitigationRequest(target="192.0.2.1")
    assert not req.HasField("ttl_s")
    assert control_pb2.DESCRIPTOR.services_by_name["Control"].methods_by_name["WatchIncidents"]
    assert hasattr(control_pb2_grpc, "ControlStub")
