"""What every benchmark shares: the description of the machine it ran on, and the timing loop.

A figure without its machine means little, so every benchmark prints
``machine_description`` beside its table; ``timed`` takes the median wall time
over rounds after warm-up, with the functions under comparison taking turns
in each round. The scripts put the checkout on ``sys.path`` before importing
this module, so they run from a checkout without installing tinyclip.
"""

import gc
import os
import platform
import statistics
import time
import tracemalloc

from tinyclip import backend


def machine_description(xp, backend_name):
    """Platform, CPU and usable cores, NumPy and its BLAS, the malloc setting, the backend and any GPU."""
    lines = [f"platform: {platform.platform()}", f"python: {platform.python_version()}"]
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"cpu: {cpu}; {usable} usable cores ({os.cpu_count()} in the machine)")
    numpy = backend.backend_module("numpy")
    lines.append(f"numpy {numpy.__version__}, BLAS: {blas_description(numpy)}")
    # whether tinyclip.backend raised glibc's mmap/trim thresholds (large temporaries then reuse heap
    # memory instead of page-faulting fresh pages in): it changes the timings, so the figure says so
    lines.append(f"glibc malloc tuned by tinyclip: {backend.MALLOC_TUNED}")
    lines.append(f"backend: {backend_name}")
    if backend_name == "cupy":
        properties = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        lines.append(f"cupy {xp.__version__}, GPU: {properties['name'].decode()}")
    return "\n".join(lines)


def blas_description(numpy):
    try:
        config = numpy.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except (TypeError, KeyError):   # NumPy < 1.25 has no mode="dicts"
        return "unknown"


def synchronizer(xp):
    """A function that waits for the device to finish its queued work (nothing to wait for on the CPU)."""
    return xp.cuda.Device().synchronize if hasattr(xp, "cuda") else (lambda: None)


def timed(functions, xp, repeat, warmup):
    """Median wall time of each function over ``repeat`` rounds after ``warmup`` rounds (device synchronised).

    The functions take turns within each round, so that a busy neighbour on a
    shared machine slows them alike and the ratio stays meaningful.
    """
    synchronize = synchronizer(xp)
    times = [[] for _ in functions]
    for round_index in range(warmup + repeat):
        for fn, samples in zip(functions, times):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            if round_index >= warmup:
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def peak_extra_bytes(step, xp, backend_name):
    """The most memory allocated and not yet freed at any moment of ``step()``, in bytes."""
    gc.collect()
    if backend_name == "cupy":
        hook = _pool_peak_hook(xp)
        with hook:
            step()
            synchronizer(xp)()
        return hook.peak
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - before


def _pool_peak_hook(cupy):
    """A ``cupy.cuda.MemoryHook`` that counts the bytes taken from the memory pool and keeps the maximum.

    The pool calls ``malloc_postprocess`` whenever it hands out a block (cached
    or fresh) and ``free_postprocess`` whenever one comes back, with the block's
    rounded size; blocks freed during the step that were taken before it count
    negative, exactly as they lower what is in use.
    """
    class PoolPeak(cupy.cuda.MemoryHook):
        name = "tinyclip_pool_peak"

        def __init__(self):
            self.in_use = self.peak = 0

        def malloc_postprocess(self, **kwargs):
            self.in_use += kwargs["mem_size"]
            self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kwargs):
            self.in_use -= kwargs["mem_size"]

    return PoolPeak()
