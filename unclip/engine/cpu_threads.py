"""How many threads torch computes with on a shared CPU: every core while the cores are free, fewer
while other processes hold them.

Why: torch's OpenMP pool splits each operator evenly over its threads and spins at the end of it, so
when another process holds a core, every operator waits for the thread that is not running. Measured
on this project's 2-core machine with other jobs running (docs/cpu.md): 2 threads were 3-22x slower
than 1. The pool's wait policy is fixed when the OpenMP runtime starts (before unclip can act; the
OMP_WAIT_POLICY=PASSIVE environment variable costs speed on an idle machine), but its size is not.

So, at most every CHECK_S seconds of generating, the policy reads the machine's busy CPU time from
/proc/stat, takes away this process's own (time.process_time, spinning included) and so learns how
many cores other processes used in that window; torch gets the cores left (rounded, at least 1, at
most what it had when the model was loaded). Off where /proc/stat cannot be read (not Linux).
"""

from __future__ import annotations

import os
import time

import torch

CHECK_S = 0.5  # a decision per half second: a few denoising steps, long enough to average scheduling
STALE_S = 5.0  # a window this long spanned an idle pipeline: start a fresh one instead of deciding


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (steal counted: another VM had it)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuThreadPolicy:
    """Call `update()` often (before each network call); it acts at most every CHECK_S seconds."""

    def __init__(self, max_threads: int | None = None, cores: int | None = None):
        self.max_threads = max_threads or torch.get_num_threads()
        self.cores = cores or os.cpu_count() or 1
        self.threads = self.max_threads
        self.enabled = self.max_threads > 1 and busy_cpu_seconds() is not None
        self._mark = self._read() if self.enabled else None

    @staticmethod
    def _read() -> tuple[float, float, float]:
        return time.monotonic(), busy_cpu_seconds() or 0.0, time.process_time()

    def update(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        wall = now - self._mark[0]
        if wall < CHECK_S:
            return
        mark = self._read()
        others = ((mark[1] - self._mark[1]) - (mark[2] - self._mark[2])) / wall  # in cores
        self._mark = mark
        if wall > STALE_S:
            return
        self.set(self.threads_for(others))

    def threads_for(self, others: float) -> int:
        return max(1, min(self.max_threads, int(self.cores - others + 0.5)))

    def set(self, threads: int) -> None:
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
