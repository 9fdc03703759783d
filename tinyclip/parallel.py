"""Row blocks on a small thread pool: element-wise NumPy work on every core of one process.

NumPy's matrix products run on every core (BLAS has its own threads), but
its ufuncs (``exp``, ``tanh``, ``*``, ``+=``, ...) run on the calling
thread only. They do release the GIL while they loop over a large array,
so the same ufunc called from several Python threads on disjoint row blocks
of the arrays runs on several cores at once. ``map_rows`` does exactly
that::

    def gelu_rows(out, x):                       # any function of row blocks
        numpy.tanh(0.7978845608 * (x + 0.044715 * x ** 3), out=out)
        out += 1
        out *= 0.5 * x

    parallel.map_rows(gelu_rows, out, x)         # out[i:j] from x[i:j], a few blocks per thread

The rows are cut into ``BLOCKS_PER_THREAD`` blocks per thread, and each
thread (the caller and the pool's helpers) takes the next untaken block
until none is left; so a helper that a busy machine starts late costs
nothing: the caller takes its blocks.

Determinism. Each block is computed by the same function on the same rows
whichever thread runs it, and the blocks are cut the same way for a given
thread count, so a result is bit for bit the same run after run. A
function whose every output row depends only on the same row of its
inputs (element-wise maths, and per-row reductions such as the layer
norm's or the softmax's over the last axis of a contiguous array) gives
the serial result bit for bit at every thread count; a function that
reduces *across* rows would see its sum cut into blocks, which is why the
pool only ever hands out whole rows and never combines them.

The pool's size is ``TINYCLIP_THREADS`` when set, else the cores this
process may run on (``os.sched_getaffinity``, ``os.cpu_count`` where that
is missing). When that is every core of the machine, they are shared out
among the MPI ranks that the launcher started on this node
(``MPI_LOCALNRANKS`` from MPICH's and Intel MPI's ``mpiexec``,
``OMPI_COMM_WORLD_LOCAL_SIZE`` from Open MPI's), at least one each; a
process bound to fewer cores (Open MPI binds each rank by default) keeps
all of its own. Small arrays (fewer than ``MIN_PARALLEL_SIZE`` elements) and
CuPy arrays, whose kernels already use the whole GPU, run in the calling
thread as one block.
"""

import concurrent.futures
import os
import threading

import numpy

from . import backend

THREADS_ENV = "TINYCLIP_THREADS"
# what MPI launchers say about the ranks they started on this node (MPICH / Intel MPI, Open MPI)
LOCAL_RANKS_ENV = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
# below this many output elements the hand-off costs more than the work it splits: on the 2-core
# development machine under load 5-6 (docs/vit.md, `benchmarks/parallel.py --sweep`) two threads were
# slower than one up to 2^17 elements for the cheapest row work (the softmax backward, 3 passes) and GELU
MIN_PARALLEL_SIZE = 1 << 18
# blocks per thread: more blocks even out threads that a busy machine starts late, each costs a Python call
BLOCKS_PER_THREAD = 2

_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def thread_count():
    """The pool size: ``TINYCLIP_THREADS`` (a positive int), or the cores this process may use: divided among
    the MPI ranks on this node (``local_ranks()``) when those are all the machine's cores, at least 1.

    Raises ValueError naming the variable when it is set to anything but a positive integer.
    """
    value = os.environ.get(THREADS_ENV)
    if value is not None and value.strip():
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
        return count
    machine = os.cpu_count() or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    if cores < machine:         # bound to some of the cores (by the launcher, say): they are this process's own
        return max(1, cores)
    return max(1, cores // local_ranks())


def local_ranks():
    """How many MPI ranks the launcher started on this node (1 outside a launcher, or when it does not say).

    Each of them runs its own pool, so that without ``TINYCLIP_THREADS`` the node's cores are shared out
    instead of every rank starting one thread per core. Raises nothing: a value that is not a positive
    integer counts as not said.
    """
    for name in LOCAL_RANKS_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def row_blocks(rows, parts):
    """[(start, stop), ...]: ``rows`` cut into ``min(parts, rows)`` contiguous blocks whose sizes differ by at most 1.

    The first ``rows % parts`` blocks get the extra row (``numpy.array_split``'s rule).
    """
    parts = max(1, min(parts, rows))
    size, extra = divmod(rows, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + size + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _executor(workers):
    """The process's pool, grown (never shrunk) to ``workers`` threads; made on first use."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tinyclip-rows")
            _pool_size = workers
        return _pool


def _split(array, rows, start, stop):
    """Rows [start, stop) of an array that has ``rows`` rows along its first axis, else the array whole."""
    return array[start:stop] if _is_row_array(array, rows) else array


def _is_row_array(array, rows):
    return isinstance(array, numpy.ndarray) and array.ndim >= 1 and array.shape[0] == rows


def map_rows(fn, out, *arrays, threads=None):
    """Call ``fn(out[i:j], *(a[i:j] for a in arrays))`` on contiguous row blocks, on ``threads`` threads.

    out: a NumPy array written in place by ``fn`` (rows along axis 0); arrays:
    NumPy arrays with ``out.shape[0]`` rows, cut like ``out``, or anything
    else (scalars, per-column vectors such as a layer norm's gain, arrays
    with another first dimension), passed whole to every block. An array of
    ``out``'s row count is always cut, so a vector meant to broadcast along
    the rows must not happen to have that length (reshape it to (1, n)).
    ``fn`` must write only its own block of ``out``; its return value is
    ignored. threads: the number of threads (default ``thread_count()``);
    the rows are cut into ``BLOCKS_PER_THREAD`` blocks per thread.

    Returns ``out``. CuPy arrays, and outputs under ``MIN_PARALLEL_SIZE``
    elements, run as one call in this thread. An exception raised by ``fn``
    in any block is raised here, after every block has finished (the first
    block's, when several fail). Raises ValueError for a ``threads`` below 1
    or a 0-d ``out``.
    """
    threads = thread_count() if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"map_rows: threads must be a positive int, got {threads!r}")
    if backend.get_array_module(out) is not numpy:   # CuPy: its kernels already use the whole device
        fn(out, *arrays)
        return out
    if out.ndim == 0:
        raise ValueError("map_rows: out must have at least one axis (rows along axis 0), got a 0-d array")
    rows = out.shape[0]
    if threads == 1 or rows < 2 or out.size < MIN_PARALLEL_SIZE:
        fn(out, *arrays)
        return out
    job = _Job(fn, out, arrays, row_blocks(rows, threads * BLOCKS_PER_THREAD))
    pool = _executor(threads - 1)
    for _ in range(threads - 1):
        pool.submit(job.work)
    job.work()                  # the calling thread works too: with two cores, one helper thread
    job.wait()
    return out


class _Job:
    """One map_rows call: its blocks, each claimed by whichever thread is free first.

    A helper thread that a busy machine does not schedule in time finds every
    block taken and returns at once, so the caller never waits for a thread
    that has not started: on a loaded machine the call is at worst about as
    slow as one thread doing it all. Which thread computes a block changes
    nothing in its result.
    """

    def __init__(self, fn, out, arrays, blocks):
        self.fn, self.out, self.arrays, self.blocks = fn, out, arrays, blocks
        self.errors = [None] * len(blocks)
        self.claimed = self.finished = 0
        self.lock = threading.Condition()

    def work(self):
        """Compute unclaimed blocks until none is left."""
        rows = self.out.shape[0]
        while True:
            with self.lock:
                index = self.claimed
                if index == len(self.blocks):
                    return
                self.claimed += 1
            start, stop = self.blocks[index]
            try:
                self.fn(self.out[start:stop], *(_split(a, rows, start, stop) for a in self.arrays))
            except BaseException as error:       # raised by wait(), in the caller, once every block is done
                self.errors[index] = error
            with self.lock:
                self.finished += 1
                if self.finished == len(self.blocks):
                    self.lock.notify_all()

    def wait(self):
        """Return when every block has finished; raise the first failed block's exception."""
        with self.lock:
            self.lock.wait_for(lambda: self.finished == len(self.blocks))
        error = next((error for error in self.errors if error is not None), None)
        if error is not None:
            raise error
