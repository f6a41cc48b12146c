"""synblast (synblast.c beside this file): IPv4 SYNs from spoofed sources at the rate one
CPU can send with sendmmsg, for benches that need more packets per second than the
Python generators reach. Compiled on first use with the C compiler install.sh --test
brings (gcc), into .cache/swarmlab/ of the checkout.

    proc = start(lab.attacker, target, 8080, "10.1.200.0", sources=4000, duration_s=10)
    result(proc)        # {"sent": ..., "errors": ..., "elapsed_s": ...}
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from swarmlab import attacks

SOURCE = Path(__file__).resolve().with_name("synblast.c")
BINARY = Path(__file__).resolve().parents[2] / ".cache" / "swarmlab" / "synblast"


class BlastError(RuntimeError):
    """synblast could not be built, or failed."""


def build() -> Path:
    """The compiled sender, rebuilt when the source is newer."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BlastError("no C compiler: ./install.sh --test installs gcc")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    tmp = BINARY.with_suffix(".tmp")
    done = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(SOURCE)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise BlastError(f"building synblast failed: {done.stderr.strip()[-500:]}")
    tmp.replace(BINARY)
    return BINARY


def start(ns: str, target: str, port: int, source_base: str, *, sources: int = 4000,
          duration_s: float = 10.0, max_packets: int = 100_000_000) -> subprocess.Popen[str]:
    """Send from namespace `ns` until `duration_s` or `max_packets`, whichever first."""
    argv = [str(build()), target, str(port), source_base, str(sources), str(duration_s),
            str(max_packets)]
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen[str], timeout_s: float = 120.0) -> dict:
    """Its JSON line (swarmlab.attacks.result: killed on timeout, AttackError on failure)."""
    return attacks.result(proc, timeout_s)
