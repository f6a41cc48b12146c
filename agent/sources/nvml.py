"""One reader of NVML through the vendored binding (agent/_vendor/pynvml.py): devices,
their counters, their processes and their events. Blocking calls, for one thread only
(agent.sources.gpu runs it). Standard library + the vendored binding only.

Errors are converted here, once: NVML "not supported" (or "no permission") on a counter
is no value for it; no library, no driver or no device is `Absent`; anything else
(GPU lost, driver/library mismatch, unknown) is `NvmlFailure`, which the source reports
as degraded and retries.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from agent._vendor import pynvml as nv

XID_EVENT = nv.nvmlEventTypeXidCriticalError
DBE_EVENT = nv.nvmlEventTypeDoubleBitEccError
# Clock event (throttle) reasons by name, as NVML defines their bits.
REASONS = {
    "gpu_idle": 0x1, "applications_clocks": 0x2, "sw_power_cap": 0x4, "hw_slowdown": 0x8,
    "sync_boost": 0x10, "sw_thermal": 0x20, "hw_thermal": 0x40, "hw_power_brake": 0x80,
    "display_clocks": 0x100,
}
_ABSENT = {nv.NVML_ERROR_LIBRARY_NOT_FOUND, nv.NVML_ERROR_DRIVER_NOT_LOADED,
           nv.NVML_ERROR_FUNCTION_NOT_FOUND}
_NO_VALUE = {nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_NO_PERMISSION,
             nv.NVML_ERROR_FUNCTION_NOT_FOUND, nv.NVML_ERROR_NO_DATA}


class Absent(Exception):
    """No NVML library, no driver, or no GPU: nothing to watch here."""


class NvmlFailure(Exception):
    """NVML answered with an error that is no "not supported" (GPU lost, mismatch)."""


def reason_names(bits: int) -> list[str]:
    return [name for name, bit in REASONS.items() if bits & bit]


def _text(v: str | bytes) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else v


def _failure(e: nv.NVMLError, what: str) -> NvmlFailure:
    return NvmlFailure(f"{what}: {e} (NVML error {e.value})")


@dataclass
class Device:
    index: int
    uuid: str
    name: str
    handle: object = field(repr=False)


@dataclass
class Sample:
    """One GPU's counters at one time; None where the GPU does not support one."""

    index: int
    uuid: str
    name: str
    util_gpu: int | None = None           # percent of the last sample period
    util_mem: int | None = None           # percent of time memory was read or written
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    temp_c: int | None = None
    power_w: float | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    throttle_bits: int | None = None
    ecc_dbe_volatile: int | None = None   # uncorrected (double-bit) errors since driver load


class Nvml:
    """An initialised NVML session (`open`), read by one thread. `library` is a path to
    load instead of the system's libnvidia-ml.so.1 (config gpu.nvml_library)."""

    def __init__(self, library: str | None = None):
        self.library = library
        self.devices: list[Device] = []
        self.driver = ""
        self._events = None
        self._open = False

    def open(self) -> None:
        """Initialise NVML and list the GPUs; Absent or NvmlFailure."""
        if self.library:
            try:   # the binding's own loader takes the global it finds set
                nv.nvmlLib = nv.nvmlLib or ctypes.CDLL(self.library)
            except OSError as e:
                raise Absent(f"cannot load {self.library}: {e}") from None
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            if e.value in _ABSENT:
                raise Absent(f"NVML unavailable: {e}") from None
            raise _failure(e, "NVML init") from None
        self._open = True
        try:
            self.driver = _text(nv.nvmlSystemGetDriverVersion())
            count = nv.nvmlDeviceGetCount()
            self.devices = []
            for i in range(count):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                self.devices.append(Device(i, _text(nv.nvmlDeviceGetUUID(h)),
                                           _text(nv.nvmlDeviceGetName(h)), h))
        except nv.NVMLError as e:
            self.close()
            raise _failure(e, "listing GPUs") from None
        if not self.devices:
            self.close()
            raise Absent("NVML sees no GPU")
        self._register_events()

    def _register_events(self) -> None:
        """XID and double-bit ECC events of every GPU that supports them; a GPU that
        supports none is still sampled (its ECC counter then catches double-bit errors)."""
        try:
            self._events = nv.nvmlEventSetCreate()
        except nv.NVMLError:
            self._events = None
            return
        registered = 0
        for d in self.devices:
            try:
                wanted = nv.nvmlDeviceGetSupportedEventTypes(d.handle) & (XID_EVENT | DBE_EVENT)
                if wanted:
                    nv.nvmlDeviceRegisterEvents(d.handle, wanted, self._events)
                    registered += 1
            except nv.NVMLError as e:
                if e.value not in _NO_VALUE:
                    raise _failure(e, f"registering events of GPU {d.index}") from None
        if not registered:     # nothing to wait on: the thread sleeps between samples
            nv.nvmlEventSetFree(self._events)
            self._events = None

    @property
    def has_events(self) -> bool:
        return self._events is not None

    def close(self) -> None:
        if self._events is not None:
            try:
                nv.nvmlEventSetFree(self._events)
            except nv.NVMLError:
                pass
            self._events = None
        if self._open:
            self._open = False
            try:
                nv.nvmlShutdown()
            except nv.NVMLError:
                pass

    def _value(self, fn, *args):
        try:
            return fn(*args)
        except nv.NVMLError as e:
            if e.value in _NO_VALUE:
                return None
            raise _failure(e, fn.__name__) from None

    def sample(self, d: Device) -> Sample:
        s = Sample(d.index, d.uuid, d.name)
        h = d.handle
        util = self._value(nv.nvmlDeviceGetUtilizationRates, h)
        if util is not None:
            s.util_gpu, s.util_mem = util.gpu, util.memory
        mem = self._value(nv.nvmlDeviceGetMemoryInfo, h)
        if mem is not None:
            s.mem_used_bytes, s.mem_total_bytes = mem.used, mem.total
        s.temp_c = self._value(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
        mw = self._value(nv.nvmlDeviceGetPowerUsage, h)
        s.power_w = None if mw is None else mw / 1000.0
        s.sm_clock_mhz = self._value(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
        s.mem_clock_mhz = self._value(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM)
        s.throttle_bits = self._value(nv.nvmlDeviceGetCurrentClocksEventReasons, h)
        if s.throttle_bits is None:    # drivers before 535 have only the older name
            s.throttle_bits = self._value(nv.nvmlDeviceGetCurrentClocksThrottleReasons, h)
        s.ecc_dbe_volatile = self._value(nv.nvmlDeviceGetTotalEccErrors, h,
                                         nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                         nv.NVML_VOLATILE_ECC)
        return s

    def processes(self, d: Device) -> list[tuple[int, int | None, str]]:
        """(pid, used GPU memory in bytes or None, "compute" | "graphics") on `d`."""
        out = []
        # Versioned calls: the unversioned ones raise a non-NVML error on a driver without
        # _v3 (before R470), which then answers to _v2 (same record layout).
        for kind, fns in (("compute", (nv.nvmlDeviceGetComputeRunningProcesses_v3,
                                       nv.nvmlDeviceGetComputeRunningProcesses_v2)),
                          ("graphics", (nv.nvmlDeviceGetGraphicsRunningProcesses_v3,
                                        nv.nvmlDeviceGetGraphicsRunningProcesses_v2))):
            procs = self._value(fns[0], d.handle)
            if procs is None:
                procs = self._value(fns[1], d.handle)
            for p in procs or ():
                out.append((int(p.pid), p.usedGpuMemory, kind))
        return out

    def process_util(self, d: Device, since_us: int) -> tuple[dict[int, int], int] | None:
        """({pid: SM utilisation %, the mean of NVML's samples of it newer than since_us},
        the newest sample's timestamp) on `d`; ({}, since_us) when NVML has no sample
        since; None where it does not answer (not supported, an older driver)."""
        def call(buf, count):
            fn = nv._nvmlGetFunctionPointer("nvmlDeviceGetProcessUtilization")
            return fn(d.handle, buf, ctypes.byref(count), ctypes.c_ulonglong(since_us))

        count = ctypes.c_uint(0)
        try:
            ret = call(None, count)
        except nv.NVMLError as e:          # no such function in this library
            if e.value in _NO_VALUE:
                return None
            raise _failure(e, "nvmlDeviceGetProcessUtilization") from None
        if ret == nv.NVML_ERROR_NOT_FOUND:
            return {}, since_us
        if ret in _NO_VALUE:
            return None
        if ret not in (nv.NVML_SUCCESS, nv.NVML_ERROR_INSUFFICIENT_SIZE):
            raise _failure(nv.NVMLError(ret), "nvmlDeviceGetProcessUtilization")
        buf = (nv.c_nvmlProcessUtilizationSample_t * max(1, count.value))()
        ret = call(buf, count)
        if ret == nv.NVML_ERROR_NOT_FOUND:
            return {}, since_us
        if ret != nv.NVML_SUCCESS:
            if ret in _NO_VALUE:
                return None
            raise _failure(nv.NVMLError(ret), "nvmlDeviceGetProcessUtilization")
        sums: dict[int, list[int]] = {}
        newest = since_us
        for sample in buf[:count.value]:
            acc = sums.setdefault(int(sample.pid), [0, 0])
            acc[0] += int(sample.smUtil)
            acc[1] += 1
            newest = max(newest, int(sample.timeStamp))
        return {pid: round(total / n) for pid, (total, n) in sums.items()}, newest

    def wait_event(self, timeout_ms: int) -> tuple[Device | None, int, int] | None:
        """The next XID/ECC event (device, event type, data: the XID), None on timeout
        or without an event set."""
        if self._events is None:
            return None
        try:
            data = nv.nvmlEventSetWait(self._events, timeout_ms)
        except nv.NVMLError as e:
            if e.value == nv.NVML_ERROR_TIMEOUT:
                return None
            raise _failure(e, "waiting for GPU events") from None
        addr = ctypes.cast(data.device, ctypes.c_void_p).value
        dev = next((d for d in self.devices
                    if ctypes.cast(d.handle, ctypes.c_void_p).value == addr), None)
        return dev, int(data.eventType), int(data.eventData)
