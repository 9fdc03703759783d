"""Tests for tinyclip.parallel: row blocks on a thread pool give the serial result bit for bit.

The functions are the element-wise work of a training step (the tanh GELU
forward and backward, a row-wise layer norm and softmax, the AdamW update)
written with ``out=`` ufuncs, on odd shapes large enough to be cut, at
several thread counts; plus the block rule, errors, the environment
variable and the device path (the strict CuPy stand-in runs in one call).
"""

import threading

import numpy
import pytest
from hypothesis import given, strategies as st

from tinyclip import parallel

from . import strict_backend

SQRT_2_OVER_PI = 0.7978845608028654


def gelu_tanh(out, x):
    inner = SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
    numpy.tanh(inner, out=out)
    out += 1
    out *= 0.5 * x


def gelu_tanh_backward(out, x, grad):
    tanh = numpy.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
    dinner = SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x ** 2)
    numpy.multiply(grad, 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh ** 2) * dinner, out=out)


def layer_norm(out, x, gain, shift):
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    numpy.multiply(centred, 1 / numpy.sqrt(variance + 1e-5), out=out)
    out *= gain
    out += shift


def softmax(out, x):
    numpy.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    numpy.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)


def adamw(out, param, grad, m, v):
    """One AdamW step (lr 1e-3, betas 0.9 / 0.98, eps 1e-6, decay 0.1, step 3) into out; m and v in place."""
    m *= 0.9
    m += 0.1 * grad
    v *= 0.98
    v += 0.02 * grad * grad
    update = (m / (1 - 0.9 ** 3)) / (numpy.sqrt(v / (1 - 0.98 ** 3)) + 1e-6)
    numpy.subtract(param * (1 - 1e-3 * 0.1), 1e-3 * update, out=out)


def random(shape, seed, dtype=numpy.float32):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def cut_small_arrays(monkeypatch):
    """A threshold of 1,000 elements, so that these tests' small arrays are cut as a training step's large ones."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SIZE", 1000)


# odd shapes, all above the threshold so that they really are cut; the last one just above the real one
SHAPES = [(1001, 67), (257, 3, 61), (parallel.MIN_PARALLEL_SIZE + 3,)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [2, 3, 7])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_elementwise_and_row_functions_match_serial_bit_for_bit(shape, threads, dtype):
    x, grad = random(shape, 1, dtype), random(shape, 2, dtype)
    gain, shift = random(shape[-1:], 3, dtype), random(shape[-1:], 4, dtype)
    cases = [(gelu_tanh, (x,)), (gelu_tanh_backward, (x, grad))]
    if len(shape) > 1:           # a 1-D array's rows are its elements: a row-wise reduction needs 2-D
        cases += [(softmax, (x,)), (layer_norm, (x, gain, shift))]
    for fn, arrays in cases:
        serial = numpy.empty_like(x)
        fn(serial, *arrays)
        threaded = numpy.full_like(x, numpy.nan)
        assert parallel.map_rows(fn, threaded, *arrays, threads=threads) is threaded
        assert threaded.tobytes() == serial.tobytes(), fn.__name__


@pytest.mark.parametrize("threads", [2, 5])
def test_adamw_update_with_moments_in_place_matches_serial(threads):
    size = 40_003                                   # flat parameters, not a multiple of the block count
    param, grad = random(size, 5), random(size, 6)
    moments = [(random(size, 7) * 0.01, numpy.abs(random(size, 8)) * 1e-4) for _ in range(2)]
    serial, threaded = numpy.empty_like(param), numpy.empty_like(param)
    adamw(serial, param, grad, *moments[0])
    parallel.map_rows(adamw, threaded, param, grad, *moments[1], threads=threads)
    assert threaded.tobytes() == serial.tobytes()
    assert moments[1][0].tobytes() == moments[0][0].tobytes() and moments[1][1].tobytes() == moments[0][1].tobytes()


def test_blocks_run_on_pool_threads_as_well_as_the_caller():
    seen, lock = [], threading.Lock()
    # the first two blocks meet at a barrier: the call can only finish if a pool thread runs one of them
    # while the caller runs the other (a barrier that times out raises BrokenBarrierError)
    barrier = threading.Barrier(2, timeout=60)

    def record(out, x):
        with lock:
            seen.append(threading.get_ident())
            first_two = len(seen) <= 2
        if first_two:
            barrier.wait()
        out[...] = x

    x = random((600, 100), 9)
    out = numpy.empty_like(x)
    parallel.map_rows(record, out, x, threads=3)
    assert len(seen) == len(parallel.row_blocks(600, 3 * parallel.BLOCKS_PER_THREAD))
    assert threading.get_ident() in seen and len(set(seen)) >= 2
    assert out.tobytes() == x.tobytes()


def test_a_late_helper_thread_leaves_its_blocks_to_the_caller():
    """A helper that has not started by the time the caller runs out of blocks is not waited for."""
    released = threading.Event()
    pool = parallel._executor(1)
    # every pool thread busy until the call is over; each returns whether it was released (not timed out)
    busy = [pool.submit(released.wait, 30) for _ in range(parallel._pool_size)]
    x = random((400, 100), 14)
    out = numpy.empty_like(x)
    try:
        parallel.map_rows(lambda block, source: block.__setitem__(Ellipsis, source), out, x, threads=2)
    finally:
        released.set()
    assert out.tobytes() == x.tobytes()
    assert all(future.result() for future in busy), "map_rows waited for a pool thread that had not started"


def test_small_arrays_and_one_thread_run_as_one_call():
    calls = []

    def count(out, x):
        calls.append(out.shape)
        out[...] = x

    small = random((10, 10), 10)
    parallel.map_rows(count, numpy.empty_like(small), small, threads=4)
    large = random((300, 200), 11)
    parallel.map_rows(count, numpy.empty_like(large), large, threads=1)
    assert calls == [(10, 10), (300, 200)]


@given(rows=st.integers(0, 500), parts=st.integers(1, 40))
def test_row_blocks_cover_the_rows_in_order_with_sizes_within_one(rows, parts):
    blocks = parallel.row_blocks(rows, parts)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(stop == start for (_, stop), (start, _) in zip(blocks, blocks[1:]))
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert len(blocks) == max(1, min(parts, rows))


def test_an_error_in_any_block_is_raised_after_all_blocks_finish():
    def fail_where_x_is_2(out, x):
        out[...] = x                                  # written first: every block's rows show that it ran
        if (x == 2).any():
            raise ArithmeticError(f"block from row value {x[0, 0]}")

    x = numpy.repeat(numpy.arange(3, dtype=numpy.float32), 200)[:, None] * numpy.ones((1, 100), numpy.float32)
    out = numpy.full_like(x, numpy.nan)
    with pytest.raises(ArithmeticError, match="block from row value"):
        parallel.map_rows(fail_where_x_is_2, out, x, threads=3)
    assert out.tobytes() == x.tobytes()


@pytest.mark.parametrize("threads", [0, -1, 2.0, True])
def test_bad_thread_counts_are_refused(threads):
    x = random((4, 4), 12)
    with pytest.raises(ValueError, match="threads"):
        parallel.map_rows(gelu_tanh, numpy.empty_like(x), x, threads=threads)


def test_zero_dimensional_out_is_refused():
    with pytest.raises(ValueError, match="at least one axis"):
        parallel.map_rows(gelu_tanh, numpy.zeros(()), numpy.zeros(()))


def test_thread_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv(parallel.THREADS_ENV, "3")
    assert parallel.thread_count() == 3
    monkeypatch.delenv(parallel.THREADS_ENV)
    assert parallel.thread_count() >= 1
    for bad in ("0", "two", "-4"):
        monkeypatch.setenv(parallel.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=parallel.THREADS_ENV):
            parallel.thread_count()


def test_device_arrays_run_as_one_call_on_the_device(monkeypatch):
    strict = strict_backend.install(monkeypatch)
    x = strict.asarray(random((400, 100), 13))
    out = strict.empty_like(x)
    calls = []

    def copy(block, source):
        calls.append(block.shape)
        block[...] = source

    assert parallel.map_rows(copy, out, x, threads=4) is out
    assert calls == [(400, 100)]


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.delenv(parallel.THREADS_ENV, raising=False)
    for name in parallel.LOCAL_RANKS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 8)


@pytest.mark.parametrize("variable, value, expected", [
    (None, None, 8),                                    # no launcher: every core
    ("MPI_LOCALNRANKS", "3", 2),                        # MPICH's mpiexec: 8 // 3 each
    ("OMPI_COMM_WORLD_LOCAL_SIZE", "4", 2),             # Open MPI's
    ("MPI_LOCALNRANKS", "16", 1),                       # more ranks than cores: still one thread each
    ("MPI_LOCALNRANKS", "two", 8),                      # not a count: not said
    ("MPI_LOCALNRANKS", "0", 8),
])
def test_the_default_pool_shares_the_cores_among_the_ranks_on_the_node(eight_cores, monkeypatch, variable, value,
                                                                         expected):
    if variable is not None:
        monkeypatch.setenv(variable, value)
    assert parallel.thread_count() == expected
    monkeypatch.setenv(parallel.THREADS_ENV, "5")        # the user's count always wins
    assert parallel.thread_count() == 5


def test_a_rank_bound_to_some_cores_keeps_them_all(eight_cores, monkeypatch):
    # Open MPI binds each rank to its own cores: dividing them again by the ranks would leave cores idle
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {4, 5, 6, 7}, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    assert parallel.thread_count() == 4


def test_ranks_under_a_real_mpiexec_each_take_their_share_of_the_cores():
    import os
    import subprocess
    import sys
    from .test_distributed import find_mpiexec, mpi_ready
    if not mpi_ready():
        pytest.skip("needs mpi4py and mpiexec (pip install 'tinyclip[mpi]')")
    env = {name: value for name, value in os.environ.items()
           if name != parallel.THREADS_ENV and not name.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "PMIX_"))}
    code = "from tinyclip import parallel; print(parallel.local_ranks(), parallel.thread_count(), flush=True)"
    done = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    expected = max(1, cores // 2) if cores == os.cpu_count() else cores      # MPICH's mpiexec binds nothing
    assert done.stdout.split("\n")[:2] == [f"2 {expected}"] * 2, done.stdout
