"""The stand-in NVML library (fake_nvml.c) for tests: built with gcc, scripted through a
state file the test rewrites (format in fake_nvml.c's header comment)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
H200_BYTES = 150_754_820_096


def build(out_dir: Path) -> Path:
    """Compile the stand-in as out_dir/libnvidia-ml.so.1; its path."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is needed to build the stand-in NVML library "
                           "(install.sh --test installs it)")
    lib = out_dir / "libnvidia-ml.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(lib),
                    str(SOURCE)], check=True, capture_output=True, text=True)
    return lib


class Script:
    """The state file: GPUs, processes, events and failures, written atomically (the
    library re-reads it on every call, so a half-written file must never be seen)."""

    def __init__(self, path: Path):
        self.path = path
        self.gpus: list[dict] = []
        self.procs: list[dict] = []
        self.events: list[dict] = []
        self.fail: int | None = None
        self.init_fail: int | None = None
        self.driver = "550.54.15"

    def gpu(self, **kw) -> "Script":
        base = {"uuid": f"GPU-{len(self.gpus):08x}-fake", "name": "NVIDIA_H200", "util": 0,
                "memutil": 0, "total": H200_BYTES, "used": 0, "temp": 35, "power": 90000,
                "sm": 1980, "mem": 2619, "reasons": 0, "dbe": 0}
        self.gpus.append({**base, **kw})
        return self

    def write(self) -> None:
        lines = [f"driver {self.driver}"]
        if self.fail:
            lines.append(f"fail {self.fail}")
        if self.init_fail:
            lines.append(f"init_fail {self.init_fail}")
        for kind, items in (("gpu", self.gpus), ("proc", self.procs), ("event", self.events)):
            lines += [f"{kind} " + " ".join(f"{k}={v}" for k, v in i.items()) for i in items]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)

    def xid(self, gpu: int, xid: int) -> None:
        self.events.append({"gpu": gpu, "id": len(self.events) + 1, "type": 8, "data": xid})
        self.write()
