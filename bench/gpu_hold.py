"""A small GPU process for bench/gpu_check.sh, without torch or nvcc: the CUDA driver API
through ctypes (libcuda.so.1: cuInit, cuDeviceGet, the primary context, cuMemAlloc, cuMemsetD8),
holding MIB of device memory on GPU INDEX for SECONDS; torch instead if libcuda fails
and torch is installed. Prints one line "ready <pid> <CLOCK_MONOTONIC ns> <how>" once the
memory is allocated and touched (the moment the process is a GPU user), then sleeps.

  python3 bench/gpu_hold.py [--gpu 0] [--mib 512] [--seconds 20]
Exit status: 0 after sleeping, 3 when no CUDA is usable (the reason on stderr).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time


def _cuda(index: int, nbytes: int) -> str:
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(name: str, rc: int) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            cuda.cuGetErrorString(rc, ctypes.byref(msg))
            raise OSError(f"{name}: CUDA error {rc} ({(msg.value or b'?').decode()})")

    check("cuInit", cuda.cuInit(0))
    dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    check("cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(dev), index))
    # The device's primary context (what the CUDA runtime uses): its symbol is the same in
    # every driver since CUDA 7, unlike cuCtxCreate's versions.
    check("cuDevicePrimaryCtxRetain", cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    check("cuCtxSetCurrent", cuda.cuCtxSetCurrent(ctx))
    check("cuMemAlloc", cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)))
    check("cuMemsetD8", cuda.cuMemsetD8_v2(ptr, ctypes.c_ubyte(0x5a), ctypes.c_size_t(nbytes)))
    check("cuCtxSynchronize", cuda.cuCtxSynchronize())
    return "cuda-driver-api"


def _torch(index: int, nbytes: int) -> str:
    import torch   # noqa: PLC0415 -- only when the driver API is not usable

    global _keep
    _keep = torch.ones(nbytes, dtype=torch.uint8, device=f"cuda:{index}")
    torch.cuda.synchronize()
    return "torch"


_keep = None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--seconds", type=float, default=20.0)
    a = p.parse_args()
    nbytes = a.mib << 20
    errors = []
    how = None
    for attempt in (_cuda, _torch):
        try:
            how = attempt(a.gpu, nbytes)
            break
        except (OSError, ImportError, RuntimeError, AttributeError) as e:
            errors.append(f"{attempt.__name__.strip('_')}: {e}")
    if how is None:
        print("gpu_hold: no usable CUDA: " + "; ".join(errors), file=sys.stderr)
        return 3
    print(f"ready {os.getpid()} {time.monotonic_ns()} {how}", flush=True)
    time.sleep(a.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
