"""Chunk tasks of the blocks that run without autograd, spread over CPU threads that each run ops on 1 core.

Why: torch runs every op on all its intra-op threads and waits for the slowest at the end of each op. A full-size
forward is about 12,000 ops, many short and memory-bound, and with 2 threads both cores do the same kind of work at
the same moment (both stream memory, then both multiply). Here each of `torch.get_num_threads()` Python threads runs
whole chunk tasks with single-threaded ops; torch releases the GIL inside ops, so tasks overlap, and the threads
drift apart to different kinds of work (one cell's or block's keys while another chunk attends). Measured at full
size on 2 cores, in one process alternating with the previous code (same weights, random order, median of 6-8
pairs): bf16 inference 3% faster at batch 1 and 6% at batch 2; float32 within +-3% (no gain, no loss).

How: `count()` makes a pool of that many threads, each of which sets its own torch thread count to 1 once (the
count is per OS thread with torch's OpenMP backend); the process-wide default that new threads start from is then
restored, and the caller's own count stays as it was. `run_graph` runs a graph of tasks on them. If the per-thread
setting does not hold (another threading backend), there is no pool and everything runs in the calling thread, as
it does on other devices, with 1 thread, and in a forked child (e.g. a DataLoader worker) until it makes its own.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
Task = tuple[Any, Hashable, Callable[[Any], Any]]  # (priority, key, fn(state))

# Chunk tasks smaller than this (multiply-adds of a chunk's query projection: tokens x dim x heads x dim_head) run in
# the calling thread: handing them to threads costs more than it gains. At the demo size (801 tokens, dim 64, 4 heads
# of 16: 3.3 M) the pool made one cell's inference 1.6x slower; at full size (2,048 x 200 x 10 x 64: 262 M) faster.
MIN_TASK_WORK = 1 << 24

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_unsupported = False  # set when the per-thread setting did not hold: never try again in this process


def count(device: torch.device) -> int:
    """How many threads run chunk tasks on `device`: torch's thread count on a CPU (when the pool works), else 1."""
    if device.type != "cpu" or _unsupported:
        return 1
    threads = torch.get_num_threads()
    if threads <= 1:
        return 1
    with _lock:
        return threads if _ensure_pool(threads) else 1


def run_graph(
    first: Iterable[Task],
    on_done: Callable[[Hashable, object], Iterable[Task]],
    states: Sequence[object],
) -> None:
    """Run a graph of tasks that unfolds as it runs, on `len(states)` threads of the pool (or here, with one).

    A task is (priority, key, fn): fn(state) is called on a thread with that thread's own state (e.g. its scratch
    buffers); the ready task with the lowest priority runs first. When a task is done, `on_done(key, result)` is
    called, under a lock and one at a time, and returns the tasks that have become ready. Returns when nothing is
    ready or running; a task's exception stops the run and is raised here. Tasks run in the caller's inference mode
    and otherwise with a thread's defaults (grad mode on, autocast off): they set what else they need.
    """
    ready: list[tuple] = []
    order = itertools.count()  # ties keep the order tasks were made in
    for priority, key, fn in first:
        heapq.heappush(ready, (priority, next(order), key, fn))
    changed = threading.Condition()
    running = 0
    errors: list[BaseException] = []
    inference = torch.is_inference_mode_enabled()  # thread-local like grad mode: tensors made in it need it

    def loop(state) -> None:
        with torch.inference_mode(inference):
            work(state)

    def work(state) -> None:
        nonlocal running
        while True:
            with changed:
                while not ready and running and not errors:
                    changed.wait()
                if errors or not ready:
                    changed.notify_all()
                    return
                _, _, key, fn = heapq.heappop(ready)
                running += 1
            try:
                result = fn(state)
            except BaseException as error:
                with changed:
                    running -= 1
                    errors.append(error)
                    changed.notify_all()
                return
            with changed:
                running -= 1
                for priority, new_key, new_fn in on_done(key, result):
                    heapq.heappush(ready, (priority, next(order), new_key, new_fn))
                changed.notify_all()

    pool = _pool
    if len(states) <= 1 or pool is None:
        loop(states[0])
    else:
        for future in [pool.submit(loop, state) for state in states]:
            future.result()
    if errors:
        raise errors[0]


def _on_every_thread(pool: ThreadPoolExecutor, size: int, fn: Callable[[], T]) -> list[tuple[int, T]]:
    """(thread id, fn()) from each of the pool's `size` threads: a barrier holds every call until all have started."""
    barrier = threading.Barrier(size)

    def call() -> tuple[int, T]:
        result = fn()
        barrier.wait(timeout=60)
        return threading.get_ident(), result

    return [future.result() for future in [pool.submit(call) for _ in range(size)]]


def _single_threaded() -> int:
    torch.get_num_threads()  # torch sets a thread's count lazily from the process default: settle it first
    torch.set_num_threads(1)
    return torch.get_num_threads()


def _ensure_pool(threads: int) -> bool:
    global _pool, _pool_size, _unsupported
    if _pool is not None and _pool_size == threads:
        return True
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool, _pool_size = None, 0
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="performer-chunks")
    try:
        first = _on_every_thread(pool, threads, _single_threaded)
        torch.set_num_threads(threads)  # the default new threads start from, and this thread's own count
        after = _on_every_thread(pool, threads, torch.get_num_threads)
    except Exception:  # e.g. a barrier timeout on a starved machine: run in the calling thread instead
        first, after = [], []
    ids = {thread for thread, _ in first}
    works = (
        len(ids) == threads
        and all(n == 1 for _, n in first + after)
        and {thread for thread, _ in after} == ids
        and torch.get_num_threads() == threads
    )
    if not works:
        pool.shutdown(wait=False)
        torch.set_num_threads(threads)
        _unsupported = True
        return False
    _pool, _pool_size = pool, threads
    return True


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads: it starts without a pool (and may make its own)."""
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)
