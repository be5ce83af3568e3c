"""Each rank's memory, phase by phase: what it held when a phase began and the most it held
during it (resident host memory; allocated GPU memory on GPUs).

The kernel's high-water mark of resident memory (VmHWM) is reset at the start of each phase
(`/proc/self/clear_refs`), so every phase reports its own peak, not the run's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from dpo_contract.reports import PhaseMemory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK_RSS = "5"


def resident_bytes(field: str = "VmRSS") -> int:
    """A field of /proc/self/status in bytes: VmRSS (now) or VmHWM (the peak since reset)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


class PhaseMemoryRecorder:
    """`with recorder.phase("load"): ...` records that phase's PhaseMemory."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.phases: dict[str, PhaseMemory] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = resident_bytes()
        _CLEAR_REFS.write_text(_RESET_PEAK_RSS)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            self.phases[name] = PhaseMemory(
                start_bytes=start,
                peak_bytes=max(resident_bytes("VmHWM"), start),
                device_peak_bytes=int(torch.cuda.max_memory_allocated())
                if self.device == "cuda"
                else None,
            )
