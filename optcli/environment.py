"""The machine a report was measured on: versions, CPU, threads (int8 results differ between CPUs)."""

from __future__ import annotations

import os
import platform
import sys


def environment(threads: int) -> dict:
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": sys.platform,
    }
