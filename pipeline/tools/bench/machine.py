"""Facts about the machine a bench run measured on."""

from __future__ import annotations

import os
import platform

from pipeline.tools.machine import cpu_model


def machine_facts() -> dict[str, object]:
    import torch

    facts: dict[str, object] = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(_total_memory() / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return facts


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total
