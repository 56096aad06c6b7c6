"""Whether an NVIDIA driver is loaded, without importing the hardware layer or pynvml.

``llamactl serve`` asks this on its way to the first answer (the budget and
the meter); :mod:`buildtools.hardware.cuda` asks it before loading NVML.
"""

from __future__ import annotations

import os
import sys

__all__ = ["NO_DRIVER", "nvidia_driver_loaded"]

#: the reason given for "no GPU" when the check says no
NO_DRIVER = "NVIDIA driver not loaded (no /proc/driver/nvidia)"


def nvidia_driver_loaded() -> bool:
    """False only where NVML certainly cannot work: Linux without the NVIDIA kernel module.

    The module shows as /proc/driver/nvidia (in containers too); WSL2 has no
    such module but reaches the Windows driver through /dev/dxg. Checking
    first spares importing pynvml and a failing nvmlInit (~10 ms) on every
    ``serve`` of a machine without an NVIDIA GPU.
    """
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/dxg")  # noqa: PTH110
