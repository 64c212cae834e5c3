"""How many threads torch's CPU ops use, by the size of the model's work and the cores other processes leave free.

Why: torch runs an op on all its intra-op (OpenMP) threads and waits at the end of the op for the slowest. When
another process keeps a core busy, one of those threads waits for a time slice (milliseconds) at every op. A
demo-size step is thousands of ops of tens of microseconds each, so it then spends most of its time waiting: on the
2-core development machine, demo-size pretraining went from 102 cells/s alone to 7.1 cells/s beside one busy core
with 2 threads, and kept 73 cells/s with 1 thread (issue 21). At that size one thread is about as fast as two on a
quiet machine too: the ops are too small to split. At full size the ops are long, but a training step still loses
most of its speed when its threads outnumber the free cores: with the machine busy with other jobs, a full-size
fine-tuning step took 34-81 s with 2 threads and 15-20 s with 1, in the same process alternating.

The policy (`choose_threads`, the one place it lives):
- work per cell below `SMALL_WORK`: 1 thread, whatever the machine;
- otherwise: as many threads as cores are free of other processes' work (rounded), between 1 and `ceiling()`.
`configure_threads(model)` applies it once the model is built and then keeps it current: a forward pre-hook looks
at the machine's load again every `RECHECK_SECONDS` (two small reads of /proc, no waiting) and changes the count
when the free cores changed. A count set by the user before (OMP_NUM_THREADS, or `torch.set_num_threads` before the
first call) is the ceiling, never exceeded.
"""

from __future__ import annotations

import os
import threading
import time
import weakref

import torch

# Work per cell: multiply-adds of one block's query projection, tokens x dim x heads x dim_head (the measure
# `cpu_workers.MIN_TASK_WORK` uses for chunks). The demo size (801 x 64 x 4 x 16) is 3.3 M, full size
# (16,907 x 200 x 10 x 64) 2.2 G. The crossover between the two has not been measured: this is their geometric middle,
# rounded down to a power of two.
SMALL_WORK = 1 << 26
RECHECK_SECONDS = 5.0  # how often a running model looks at the load again
FIRST_LOOK_SECONDS = 0.2  # the first look, at set-up, waits this long to see what the other processes use

_ceiling: int | None = None
# The policy of each configured model, looked up by the hook (kept off the module, which may be deep-copied).
_policies: weakref.WeakKeyDictionary[torch.nn.Module, ThreadPolicy] = weakref.WeakKeyDictionary()
_hooks: weakref.WeakKeyDictionary[torch.nn.Module, object] = weakref.WeakKeyDictionary()


def model_work(model: torch.nn.Module) -> int:
    """tokens x dim x heads x dim_head of a PerformerLM (from its `config`); a model of another family gives its own
    `work_per_cell()` on the same scale; 0 for a module with neither."""
    own = getattr(model, "work_per_cell", None)
    if callable(own):
        return int(own())
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or not {"max_seq_len", "dim", "heads", "dim_head"} <= set(config):
        return 0
    return int(config["max_seq_len"]) * int(config["dim"]) * int(config["heads"]) * int(config["dim_head"])


def ceiling() -> int:
    """The most threads to use: torch's count when this was first asked (it honours OMP_NUM_THREADS and an earlier
    `torch.set_num_threads`), at most the cores this process may run on."""
    global _ceiling
    if _ceiling is None:
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _ceiling = max(1, min(torch.get_num_threads(), allowed))
    return _ceiling


def choose_threads(work: int, *, allowed: int, free_cores: float | None = None) -> int:
    """Threads for a model whose work per cell is `work` (see `model_work`): 1 for small work, else the free cores
    (None: unknown, taken as all) rounded to the nearest whole core, between 1 and `allowed`."""
    if work < SMALL_WORK or allowed <= 1:
        return 1
    if free_cores is None:
        return allowed
    return max(1, min(allowed, int(free_cores + 0.5)))


class LoadMeter:
    """Cores kept busy by other processes since the last reading: the machine's busy time (/proc/stat) less this
    process's own (/proc/self/stat). None where /proc cannot be read (not Linux)."""

    def __init__(self) -> None:
        self.last = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime, clock ticks, every thread
        except (OSError, ValueError, IndexError):
            return None
        idle = values[3] + values[4]  # idle + iowait
        return float(sum(values)), float(sum(values) - idle), float(own)

    def others_busy(self) -> float | None:
        """Cores busy with other processes' work, averaged since the last call (or since the meter was made)."""
        now = self._read()
        before, self.last = self.last, now
        if now is None or before is None:
            return None
        total = now[0] - before[0]
        if total <= 0:
            return None
        cores = os.cpu_count() or 1
        # /proc/stat sums every core's ticks; /proc/self/stat counts this process's in the same unit (USER_HZ).
        busy = (now[1] - before[1]) - (now[2] - before[2])
        return max(0.0, cores * busy / total)


class ThreadPolicy:
    """The thread count for one model's runs, kept current as the load changes (see the module docstring)."""

    def __init__(self, work: int, *, allowed: int | None = None, meter: LoadMeter | None = None) -> None:
        self.work = work
        self.allowed = allowed if allowed is not None else ceiling()
        self.adaptive = work >= SMALL_WORK and self.allowed > 1
        self.meter = meter if meter is not None else (LoadMeter() if self.adaptive else None)
        self.last_check = time.monotonic()
        self.lock = threading.Lock()

    def threads(self, free_cores: float | None) -> int:
        return choose_threads(self.work, allowed=self.allowed, free_cores=free_cores)

    def free_cores(self) -> float | None:
        busy = self.meter.others_busy() if self.meter is not None else None
        return None if busy is None else (os.cpu_count() or 1) - busy

    def apply(self) -> int:
        threads = self.threads(self.free_cores() if self.adaptive else None)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.last_check = time.monotonic()
        return threads

    def recheck(self) -> None:
        """Apply the policy again when `RECHECK_SECONDS` have passed (main thread only: torch's thread count is per
        OS thread)."""
        if not self.adaptive or time.monotonic() - self.last_check < RECHECK_SECONDS:
            return
        if threading.current_thread() is not threading.main_thread() or not self.lock.acquire(blocking=False):
            return
        try:
            self.apply()
        finally:
            self.lock.release()


def configure_threads(model: torch.nn.Module, device: torch.device | str = "cpu") -> int:
    """Set torch's thread count for running `model` on `device` and keep it current; returns the count now.

    Called once by each script after building its model (`training.wrap_model`, predict.py). Off the CPU nothing
    changes. Calling it again for the same model replaces its policy."""
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    old = _hooks.pop(model, None)
    if old is not None:
        old.remove()
    policy = ThreadPolicy(model_work(model))
    _policies[model] = policy
    if policy.adaptive:
        time.sleep(FIRST_LOOK_SECONDS)  # a first reading of what the other processes use
        _hooks[model] = model.register_forward_pre_hook(_recheck)
    return policy.apply()


def _recheck(module: torch.nn.Module, _args) -> None:
    policy = _policies.get(module)
    if policy is not None:
        policy.recheck()
