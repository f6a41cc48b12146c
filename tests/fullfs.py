"""A small tmpfs to fill up: the real ENOSPC a full disk gives, in a few milliseconds.

`SmallFs(path)` mounts a tmpfs of `size_kb` on `path` (root only; the mount is private
to this mount namespace's view of `path` and removed by `close`, lazily if busy).
`fill()` writes a filler file until the filesystem is full; `free()` deletes it;
`readonly()` remounts it read-only (and back).
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path


class SmallFs:
    def __init__(self, path: Path, size_kb: int = 512):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs",
                        str(self.path)], check=True)
        self._filler = self.path / ".filler"

    def fill(self) -> None:
        """Fill the filesystem: every further allocation fails with ENOSPC."""
        chunk = b"\1" * 4096
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for _ in range(1 << 20):          # bounded: far more than any tmpfs here
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    return
        finally:
            os.close(fd)
        raise AssertionError("the filesystem never filled up")

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def readonly(self, on: bool = True, pid: int | None = None) -> None:
        """Remount read-only (every write fails with EROFS), or read-write again; with
        `pid`, in that process's mount namespace too (`ip netns exec` gives the agent a
        copy of the mount, whose read-only flag a remount here does not change)."""
        opt = f"remount,{'ro' if on else 'rw'}"
        subprocess.run(["mount", "-o", opt, str(self.path)], check=True)
        if pid is not None:
            subprocess.run(["nsenter", "-t", str(pid), "-m", "mount", "-o", opt,
                            str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)

    def __enter__(self) -> SmallFs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def writable(path: Path) -> bool:
    try:
        fd = os.open(path / ".probe", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x" * 8192)
        os.close(fd)
        os.unlink(path / ".probe")
        return True
    except OSError:
        return False
