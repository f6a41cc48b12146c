"""Third-party code shipped inside the product because Debian and RHEL do not package it.

pynvml.py: NVIDIA's Python binding for NVML, from the PyPI wheel nvidia-ml-py==13.615.71
(unmodified; BSD licence in LICENSE.nvidia-ml-py). It loads the driver's libnvidia-ml.so.1
through ctypes at nvmlInit, so importing it needs no driver. Update by replacing the file
from a newer wheel and changing the version here and in README.md ("GPUs").
"""
NVIDIA_ML_PY_VERSION = "13.615.71"
