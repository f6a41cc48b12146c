"""Red team round 6 (R6POL-1): exectarget resolves a script named /dev/fd/N in the AGENT's
own fd table. A real process runs a /tmp `#!` script exec'd as /dev/fd/3 (what fexecve
and `exec 3<script; exec /dev/fd/3` do; the kernel's filename is "/dev/fd/3").
exectarget._open joins it to /proc/PID/root: /proc/PID/root/dev/fd -> /proc/self/fd, and
/proc/self is the agent, so the agent judges whatever it holds on its fd 3 (here
/etc/hostname: location "", its hash) instead of the tenant's script."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from agent.sources import exectarget


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs /bin/sh")
def test_a_script_exec_d_as_dev_fd_is_judged_not_the_agents_own_fd(tmp_path):
    d = "/tmp/swa-r6u-%d" % os.getpid()
    os.makedirs(d, exist_ok=True)
    script = os.path.join(d, "dropper.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\nsleep 30\n")
    os.chmod(script, 0o755)
    p = subprocess.Popen(["/bin/sh", "-c", f"exec 3<{script}; exec /dev/fd/3"])
    saved = os.dup(3) if _open_fd(3) else None
    try:
        deadline = time.monotonic() + 5
        while open(f"/proc/{p.pid}/cmdline").read().split("\0")[1:2] != ["/dev/fd/3"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        st = os.stat(f"/proc/{p.pid}/exe")
        own = os.open("/etc/hostname", os.O_RDONLY)        # what the agent holds on fd 3
        os.dup2(own, 3)
        os.close(own)
        out = exectarget.target_fields(p.pid, (st.st_dev, st.st_ino),
                                       os.readlink(f"/proc/{p.pid}/exe"), "/dev/fd/3",
                                       ["/bin/sh", "/dev/fd/3"], frozenset(), frozenset(),
                                       None)
        assert out.get("target_location") == "tmp", (
            f"judged the agent's own fd 3, not the /tmp script: {out}")
    finally:
        p.kill()
        p.wait()
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        os.unlink(script)
        os.rmdir(d)


def _open_fd(n: int) -> bool:
    try:
        os.fstat(n)
        return True
    except OSError:
        return False
