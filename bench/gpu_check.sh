#!/usr/bin/env bash
# The GPU source against a real NVIDIA GPU and driver: one prepared check, about a minute.
#
#   bench/gpu_check.sh            (as root, from anywhere; needs no network, no pip, no torch)
#
# Prints the machine (nvidia-smi -L, driver), then runs bench/gpu_check.py with the system
# python3 and the NVML binding vendored in agent/_vendor (PyYAML/grpc not needed): NVML's
# view of every GPU, the sampling cost, two small CUDA processes (CUDA driver API through
# ctypes; torch only as a fallback) seen on the GPU with pid, memory, cgroup, user and
# executable, and GPU authorization: the unauthorized one judged and killed by the agent's
# exact kill while the authorized one runs on. Every check prints
# PASS/FAIL/SKIP. Output also goes to $OUT/gpu_check.txt (and the summary to
# $OUT/gpu_check.json) when $OUT is set. It changes nothing on the machine but two empty
# cgroups it creates and removes (swa-gpucheck-*) and its own test process it kills;
# never the network or the firewall.
# Exit: 0 no FAIL, 1 a FAIL, 2 no NVML/GPU, 3 no usable CUDA for the test processes.
# Environment: GPU_CHECK_ARGS (extra arguments, e.g. "--hold-s 30 --mib 1024"),
# GPU_CHECK_PYTHON (default python3), GPU_CHECK_TIMEOUT_S (default 170).
set -u
cd "$(dirname "$0")/.." || exit 2
py=${GPU_CHECK_PYTHON:-python3}

check() {
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), kernel $(uname -r), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "== 0. the machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L
  echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
  nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used,temperature.gpu,power.draw,clocks.sm,clocks.mem,persistence_mode,mig.mode.current --format=csv
else
  echo "nvidia-smi: not found"
fi
echo "python: $($py --version 2>&1) ($(command -v "$py"))"
echo "libnvidia-ml: $(ldconfig -p 2>/dev/null | grep -m1 'libnvidia-ml.so.1' | sed 's/.*=> //' || true)"
echo "libcuda: $(ldconfig -p 2>/dev/null | grep -m1 'libcuda.so.1' | sed 's/.*=> //' || true)"
echo "pid namespace: NSpid $(grep NSpid /proc/self/status | cut -f2-)  uid $(id -u)"
json=()
[ -n "${OUT:-}" ] && json=(--json-out "$OUT/gpu_check.json")
# shellcheck disable=SC2086 # GPU_CHECK_ARGS is split on purpose
PYTHONDONTWRITEBYTECODE=1 timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-170}" \
  "$py" bench/gpu_check.py "${json[@]}" ${GPU_CHECK_ARGS:-}
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: TIMED OUT after ${GPU_CHECK_TIMEOUT_S:-170} s"
echo "== gpu_check exit $rc"
return $rc
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  check 2>&1 | tee "$OUT/gpu_check.txt"
  exit "${PIPESTATUS[0]}"
fi
check 2>&1
