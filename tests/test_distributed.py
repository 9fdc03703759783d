"""Tests for tinyclip.distributed: the ring losses, data parallel, faults, and the one-process stand-in.

Under real ``mpiexec -n K`` (K = 1 … 4, the mpich wheel's launcher, the
cores oversubscribed), the scripts in tests/mpi/ check, in float64: the
shares of SigLIP's ring (one- and two-way) and of CLIP's ring and gather sum
to tinyclip.losses' value on the whole batch, the gathered per-rank
gradients and the summed scale and bias gradients equal the one-process
ones (global batches K does not divide included), each rank's scale
gradient is the derivative of its own share, a data-parallel AdamW step of
the ``tiny`` model equals the one-process step, the ring sends exactly the
bytes of the theory, bad input on one rank raises on every rank, and an
exception on one rank ends the whole job within seconds.

In-process: outside a launcher ``world()`` is the stand-in, whose losses
equal tinyclip.losses on every backend; a launcher without mpi4py gets a
clear error.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
from hypothesis import given, strategies as st

import tinyclip as tc
from tinyclip import backend, distributed, losses

from .strategies import normal

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-10


def find_mpiexec():
    """The launcher beside this Python (the mpich wheel puts it in the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def mpi_ready():
    try:
        import mpi4py  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return find_mpiexec() is not None


needs_mpi = pytest.mark.skipif(not mpi_ready(), reason="needs mpi4py and mpiexec (pip install 'tinyclip[mpi]')")


def launch(ranks, script, timeout=240):
    """Run ``python -m tests.mpi.<script>`` on ``ranks`` processes; returns the CompletedProcess."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "PMIX_"))}
    environment["TINYCLIP_BACKEND"] = "numpy"
    environment["OPENBLAS_NUM_THREADS"] = "1"      # K ranks on few cores: one BLAS thread each, not K × cores
    return subprocess.run([find_mpiexec(), "-n", str(ranks), sys.executable, "-m", f"tests.mpi.{script}"],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def records(completed):
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------------
# Under mpiexec
# ---------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_losses_equal_the_one_process_losses(ranks):
    results = records(launch(ranks, "check_losses"))
    assert len(results) == 3 * 4 * 3            # batches × cases × tiles
    for result in results:
        assert result["size"] == ranks
        for key in ("loss", "image_emb", "text_emb", "scalars"):
            assert result[key] < TOLERANCE, result
        assert result["share_slope"] < 1e-7, result     # a central difference with step 1e-5


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_data_parallel_step_equals_the_one_process_step(ranks):
    results = records(launch(ranks, "check_data_parallel"))
    assert {result["case"] for result in results} == {"siglip-ring", "clip-ring", "clip-gather"}
    for result in results:
        assert result["loss"] < TOLERANCE, result
        assert result["parameters"] < 1e-9, result      # after AdamW's division by √v of tiny gradients


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_the_ring_sends_what_the_theory_says_and_bad_input_fails_everywhere(ranks):
    traffic, errors = records(launch(ranks, "check_traffic"))
    assert traffic["sent"] == [traffic["theory"]] * ranks
    assert errors["raised_everywhere"] is True


@needs_mpi
def test_no_share_of_a_float32_loss_is_below_zero():
    (result,) = records(launch(2, "check_nonnegative"))
    assert result["size"] == 2
    for name, (smallest_share, smallest_total) in result["smallest"].items():
        assert smallest_share >= 0 and smallest_total >= 0, name


@needs_mpi
def test_an_exception_on_one_rank_ends_the_job():
    start = time.monotonic()
    completed = launch(3, "check_fault", timeout=60)
    assert time.monotonic() - start < 30
    assert completed.returncode != 0
    assert completed.stderr.count("RuntimeError: rank 1 fails on purpose") == 1
    assert "unreachable" not in completed.stdout


# ---------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------

@pytest.fixture
def fresh_world(monkeypatch):
    """world() as a new process would see it: no launcher variables, nothing cached."""
    for name in distributed._LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_world", None)


def unit_rows(seed, shape):
    rows = normal(seed, shape)
    return rows / numpy.linalg.norm(rows, axis=-1, keepdims=True)


def test_outside_a_launcher_world_is_one_process_without_importing_mpi(fresh_world, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # as if mpi4py were not installed
    comm = distributed.world()
    assert isinstance(comm, distributed.SingleProcess)
    assert (comm.rank, comm.size, comm.local_rank) == (0, 1, 0)
    assert distributed.world() is comm


def test_a_launcher_without_mpi4py_is_a_clear_error(fresh_world, monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(RuntimeError, match=r"4 processes.*mpi4py.*tinyclip\[mpi\]"):
        distributed.world()


@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 9), dim=st.integers(1, 5),
       tile=st.integers(1, 10), log_scale=st.floats(-1.0, 3.0), bias=st.floats(-5.0, 2.0))
def test_one_process_losses_equal_the_losses_module(xp, seed, batch, dim, tile, log_scale, bias):
    images, texts = unit_rows(seed, (batch, dim)), unit_rows(seed + 1, (batch, dim))
    comm = distributed.SingleProcess()
    cases = [
        (lambda x, y, t, b: distributed.siglip_loss(x, y, t, b, comm=comm, tile=tile), losses.siglip_loss, True),
        (lambda x, y, t, b: distributed.siglip_loss(x, y, t, b, comm=comm, tile=tile, bidirectional=True),
         losses.siglip_loss, True),
        (lambda x, y, t: distributed.clip_loss(x, y, t, comm=comm, tile=tile), losses.clip_loss, False),
        (lambda x, y, t: distributed.clip_loss(x, y, t, comm=comm, method="gather", tile=tile),
         losses.clip_loss, False),
    ]
    for loss, reference, has_bias in cases:
        results = []
        for function in (loss, reference):
            inputs = [tc.tensor(xp.asarray(images), requires_grad=True),
                      tc.tensor(xp.asarray(texts), requires_grad=True),
                      tc.tensor(xp.asarray(log_scale), requires_grad=True)]
            if has_bias:
                inputs.append(tc.tensor(xp.asarray(bias), requires_grad=True))
            value = function(*inputs)
            value.backward()
            results.append([value.data] + [tensor.grad for tensor in inputs])
        for got, expected in zip(*results):
            numpy.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(expected), rtol=1e-12,
                                          atol=1e-12)


def test_gradient_helpers_are_identities_for_one_process():
    parameter = tc.nn.Parameter(numpy.ones(3))
    parameter.grad = numpy.full(3, 2.0)
    distributed.all_reduce_gradients([parameter], distributed.SingleProcess())
    distributed.broadcast_parameters([parameter], distributed.SingleProcess())
    numpy.testing.assert_array_equal(parameter.grad, numpy.full(3, 2.0))
    numpy.testing.assert_array_equal(parameter.data, numpy.ones(3))


@pytest.mark.parametrize("size, bidirectional, expected", [
    (1, False, (0, 0)), (4, False, (3, 0)), (1, True, (0, 0)), (2, True, (1, 0)), (5, True, (2, 2)),
    (8, True, (4, 3)),
])
def test_ring_hops_reach_every_other_rank_once(size, bidirectional, expected):
    assert distributed.ring_hops(size, bidirectional) == expected
    assert sum(distributed.ring_hops(size, bidirectional)) == size - 1


def test_bad_input_names_the_problem():
    comm = distributed.SingleProcess()
    images = unit_rows(0, (4, 3))
    with pytest.raises(ValueError, match="method must be one of"):
        distributed.clip_loss(images, images, 0.0, comm=comm, method="allreduce")
    with pytest.raises(ValueError, match="text_emb must be 2-D"):
        distributed.siglip_loss(images, images[0], 0.0, 0.0, comm=comm)
    with pytest.raises(ValueError, match="bias is nan"):
        distributed.siglip_loss(images, images, 0.0, float("nan"), comm=comm)
    with pytest.raises(ValueError, match=r"bias is None.*CLIP-family model has no bias.*use clip_loss"):
        distributed.siglip_loss(images, images, 0.0, None, comm=comm)
    with pytest.raises(ValueError, match="log_scale is None"):
        distributed.clip_loss(images, images, None, comm=comm)
    with pytest.raises(ValueError, match="log_scale is None"):
        distributed.siglip_loss(images, images, None, -10.0, comm=comm)


ONE_PROCESS_LOSSES = {
    "siglip-ring": lambda x, y, comm, tile: distributed.siglip_loss(x, y, math.log(100), 0.0, comm=comm, tile=tile),
    "clip-ring": lambda x, y, comm, tile: distributed.clip_loss(x, y, math.log(100), comm=comm, tile=tile),
    "clip-gather": lambda x, y, comm, tile: distributed.clip_loss(x, y, math.log(100), comm=comm, method="gather",
                                                                 tile=tile),
}


@given(seed=st.integers(0, 2**32 - 1), batch=st.sampled_from([1, 2, 4, 8]), tile=st.sampled_from([1, 2, 4]))
def test_one_process_float32_losses_of_matched_pairs_are_never_below_zero(xp, seed, batch, tile):
    rows = xp.asarray(unit_rows(seed, (batch, 512)).astype(numpy.float32))
    for name, loss in ONE_PROCESS_LOSSES.items():
        value = float(backend.to_numpy(loss(rows, rows.copy(), distributed.SingleProcess(), tile).data))
        assert value >= 0.0, name
        if batch == 1 and name.startswith("clip"):
            assert value == 0.0, name
