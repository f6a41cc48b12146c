"""Vendors nats-py (Apache-2.0) into agent/_vendor/nats from its wheel, rewriting its
absolute imports of `nats` to `agent._vendor.nats`: Debian 12 has no nats-py package and
nothing on a provider machine comes from PyPI, so the client travels inside the agent.

    pip download --no-deps nats-py==2.16.0 -d /tmp/w
    python3 packaging/vendor_nats.py /tmp/w/nats_py-2.16.0-py3-none-any.whl

The rewrite is mechanical and checked: afterwards no module of the copy imports a
top-level `nats`.
"""
from __future__ import annotations

import re
import shutil
import sys
import zipfile
from pathlib import Path

DEST = Path(__file__).resolve().parent.parent / "agent" / "_vendor"
PKG = "agent._vendor.nats"


def rewrite(src: str) -> str:
    lines = []
    for line in src.splitlines(keepends=True):
        indent = line[: len(line) - len(line.lstrip())]
        body = line.strip()
        m = re.fullmatch(r"import nats((?:\.\w+)*)", body)
        if m:
            # `import nats.x` binds `nats` and loads nats.x: load the vendored module, bind
            # `nats` to the vendored package so `nats.x.Y` references keep working
            mod = f"import {PKG}{m.group(1)}\n{indent}" if m.group(1) else ""
            line = f"{indent}{mod}from agent._vendor import nats\n"
        else:
            line = re.sub(r"^(\s*)from nats(\.|\s)", lambda mm: f"{mm.group(1)}from {PKG}{mm.group(2)}", line)
        lines.append(line)
    return "".join(lines)


def main(wheel: str) -> int:
    out = DEST / "nats"
    shutil.rmtree(out, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        version = re.search(r"-([^-]+)\.dist-info/", meta).group(1)
        for name in z.namelist():
            if name.startswith("nats/") and not name.endswith("/"):
                path = DEST / name
                path.parent.mkdir(parents=True, exist_ok=True)
                data = z.read(name)
                if name.endswith(".py"):
                    data = rewrite(data.decode()).encode()
                path.write_bytes(data)
            elif name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE"):
                (DEST / "LICENSE.nats-py").write_bytes(z.read(name))
    (out / "VENDORED").write_text(f"nats-py {version}, from {Path(wheel).name} by packaging/vendor_nats.py\n")
    left = [str(p) for p in out.rglob("*.py")
            if re.search(r"^\s*(from nats[. ]|import nats\b)", p.read_text(), re.M)]
    if left:
        print("vendor_nats: unrewritten imports in " + ", ".join(left), file=sys.stderr)
        return 1
    print(f"vendor_nats: nats-py {version} -> {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
