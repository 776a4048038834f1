"""Measurement helpers shared by the benchmark scripts: resident memory, tensor-byte peaks, writing a table."""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

import torch


def rss_now() -> int:
    """Resident set size of this process, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_peak() -> int:
    """High-water mark of the resident set size (``VmHWM``), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def settle(reset: bool = True) -> int:
    """Free what can be freed and give it back to the OS; with ``reset`` also reset the peak (``VmHWM`` and
    ``ru_maxrss``) to the current RSS. Returns the RSS now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return rss_now()


class TensorPeak:
    """Peak of net tensor bytes allocated at once since ``start`` (torch.profiler allocation records): what the
    tensors need, without the host allocator's retained free memory (which RSS counts)."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity

        self.prof = torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def start(self) -> None:
        self.prof.start()

    def stop(self) -> int:
        from torch._C._profiler import _EventType

        self.prof.stop()
        peak, stack = 0, list(self.prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            n = stack.pop()
            stack.extend(n.children)
            if n.tag == _EventType.Allocation:
                peak = max(peak, n.extra_fields.total_allocated)
        return peak


def emit(table: str, out: Path | None) -> str:
    """Print ``table`` and, with ``out``, also write it there (folders made)."""
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    return table
