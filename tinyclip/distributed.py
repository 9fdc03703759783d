"""Many processes over MPI: the ring-chunked losses, and data-parallel gradients.

One process per device, launched with ``mpiexec -n D``; rank r holds b_r of
the B pairs of the global batch (b_r may differ by one between ranks). The
losses here return rank r's *share* of the global loss, so that the shares
sum to the number ``tinyclip.losses`` gives on the whole batch, and after
``backward()`` every rank holds d(global loss)/d(its own embeddings). The
scale and bias get the derivative of the rank's own share; summed over ranks
(what ``all_reduce_gradients`` does for every parameter) that is the global
derivative.

SigLIP, the ring (Zhai et al. 2023, section 3.3, "efficient chunked
implementation"). Rank r scores its images against its own texts (the
positives sit on this block's diagonal), then D−1 times passes the text chunk
it holds to rank r+1 and receives one from r−1, adding a negatives-only block
each time. Forward and backward are fused: each block's contribution to
d/dY of the visiting chunk is added to a gradient buffer that travels with
the chunk and arrives home one hop after the chunk's last visit. Each rank
sends (D−1)·b·d text values out and (D−1)·b·d gradient values back, and
holds O(b·tile) logits at a time, whatever B is.

CLIP needs every row's and every column's log-sum-exp before any gradient,
so it takes two trips round the ring: the first carries each text chunk with
its columns' running log-sum-exp (the online softmax of tinyclip.tiles, kept per
column as the chunk travels), the second carries the chunk with its finished
log-sum-exp and its travelling gradient. No rank ever holds b × B logits.
``method="gather"`` is the simple baseline: all-gather both sides' embeddings,
score this rank's rows against every text and its columns against every
image, and reduce-scatter the partial gradients of the other ranks' rows.

Outside ``mpiexec``, or without mpi4py, ``world()`` is a one-process stand-in
with the same methods: the same code runs with D = 1 and no MPI at all.
Messages carry raw buffers (mpi4py's upper-case calls), never pickles.
CuPy arrays go straight to a CUDA-aware MPI and are staged through host
memory otherwise (``TINYCLIP_CUDA_AWARE_MPI=1`` or ``0`` overrides the guess).
"""

import math
import os
import sys
import threading
import time
import traceback

import numpy

from . import backend
from .autograd import Function
from .losses import clip_loss_of
from .tiles import (TiledLogits, RunningLSE, as_array, check_inputs, clip_gradient_sweep, clip_lse_sweep,
                    resolve_tile, row_softmax_sweep, scalar_input, scalar_like, scale_saved_gradients, siglip_sweep)

METHODS = ("ring", "gather")
ABORT_GRACE_SECONDS = 0.5     # how long abort() lets the launcher forward this rank's last output

# the job's size, as an MPI launcher tells every process it starts (MPICH/Hydra and Slurm's PMI, Open MPI, PMIx)
_LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


# ---------------------------------------------------------------------------------
# The communicator: MPI, or one process on its own
# ---------------------------------------------------------------------------------

class SingleProcess:
    """The world of one process: every collective is the identity, and no ring has any hops."""

    rank, size, local_rank, local_size = 0, 1, 0, 1
    cuda_aware = False

    def __init__(self):
        self.bytes_sent = 0

    def exchange(self, messages):
        raise RuntimeError("a process on its own has no neighbours to exchange with")

    def all_reduce(self, array):
        return array

    def all_gather(self, array):
        return array

    def all_gather_values(self, values, dtype):
        return numpy.asarray([values], dtype=dtype)

    def reduce_scatter(self, array, counts):
        return array

    def broadcast(self, array, root=0):
        return array

    def barrier(self):
        pass

    def abort(self, code=1):
        os._exit(code)

    def __repr__(self):
        return "SingleProcess()"


class Communicator:
    """An MPI communicator with the operations tinyclip needs, on NumPy or CuPy arrays.

    ``bytes_sent`` counts the bytes this rank hands to MPI (point-to-point:
    exactly what crosses the link; collectives: this rank's payload).
    """

    def __init__(self, mpi_comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, mpi_comm
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)   # the ranks on this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.cuda_aware = _cuda_aware_guess()
        self.bytes_sent = 0

    def __repr__(self):
        return f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    # CuPy buffers: straight to a CUDA-aware MPI, otherwise through host memory

    def _outgoing(self, array):
        array = _contiguous(array)
        if backend.get_array_module(array) is numpy:
            return array
        if self.cuda_aware:
            backend.cupy_module().cuda.get_current_stream().synchronize()   # MPI must see finished data
            return array
        return array.get()

    def _incoming(self, like, shape, dtype=None):
        """A receive buffer: on the device for a CUDA-aware MPI, else on the host (then ``_arrived``)."""
        dtype = like.dtype if dtype is None else dtype
        xp = backend.get_array_module(like)
        return (xp if self.cuda_aware else numpy).empty(shape, dtype=dtype)

    def _arrived(self, received, like):
        return backend.get_array_module(like).asarray(received)

    # point to point

    def exchange(self, messages):
        """Send and receive several messages at once: ``messages`` is a list of
        (array to send, destination, source, shape to receive); returns the
        received arrays (the senders' dtype and backend). Non-blocking sends and
        receives, then one wait: a ring that sends both ways uses both directions
        of every link at the same time, and no ordering can deadlock.
        """
        requests, buffers = [], []
        for array, destination, source, shape in messages:
            outgoing = self._outgoing(array)
            incoming = self._incoming(array, shape)
            requests.append(self.comm.Irecv(incoming, source=source))
            requests.append(self.comm.Isend(outgoing, dest=destination))
            buffers.append((incoming, array))
            self.bytes_sent += outgoing.nbytes
        self.MPI.Request.Waitall(requests)
        return [self._arrived(incoming, like) for incoming, like in buffers]

    # collectives

    def all_reduce(self, array):
        """Σ over ranks, into ``array`` (returned)."""
        outgoing = self._outgoing(array)
        result = backend.get_array_module(outgoing).empty_like(outgoing)   # beside what MPI sends: host or device
        self.comm.Allreduce(outgoing, result, op=self.MPI.SUM)
        self.bytes_sent += outgoing.nbytes
        array[...] = backend.get_array_module(array).asarray(result)
        return array

    def all_gather(self, array):
        """Every rank's ``array`` stacked along axis 0 in rank order (the ranks' lengths may differ)."""
        outgoing = self._outgoing(array)
        rows = self.all_gather_values([array.shape[0]], numpy.int64)[:, 0]
        row_size = math.prod(array.shape[1:])
        counts = rows * row_size
        gathered = self._incoming(array, (int(rows.sum()),) + tuple(array.shape[1:]))
        self.comm.Allgatherv(outgoing, (gathered, counts))
        self.bytes_sent += outgoing.nbytes
        return self._arrived(gathered, array)

    def all_gather_values(self, values, dtype):
        """A (size, len(values)) NumPy array of every rank's small list of numbers."""
        mine = numpy.asarray(values, dtype=dtype)
        every = numpy.empty((self.size, mine.size), dtype=dtype)
        self.comm.Allgather(mine, every)
        return every

    def reduce_scatter(self, array, counts):
        """Σ over ranks of ``array`` (B, ...), of which this rank gets its ``counts[rank]`` rows."""
        outgoing = self._outgoing(array)
        row_size = math.prod(array.shape[1:])
        mine = self._incoming(array, (int(counts[self.rank]),) + tuple(array.shape[1:]))
        self.comm.Reduce_scatter(outgoing, mine, [int(c) * row_size for c in counts], op=self.MPI.SUM)
        self.bytes_sent += outgoing.nbytes
        return self._arrived(mine, array)

    def broadcast(self, array, root=0):
        """Rank ``root``'s ``array`` on every rank, in place (returned)."""
        buffer = self._outgoing(array)
        self.comm.Bcast(buffer, root=root)
        if self.rank == root:
            self.bytes_sent += buffer.nbytes
        if buffer is not array:
            array[...] = backend.get_array_module(array).asarray(buffer)
        return array

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        """End every rank of the job now (no rank is left waiting in a collective).

        This rank's output is flushed first and the launcher given a moment
        (``ABORT_GRACE_SECONDS``) to forward it: MPI_Abort ends the processes
        that carry each rank's stdout/stderr to mpiexec, and the message that
        says why the job ended would otherwise be lost now and then.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_SECONDS)
        self.comm.Abort(code)


def _contiguous(array):
    return backend.get_array_module(array).ascontiguousarray(array)


def _cuda_aware_guess():
    """Whether the MPI takes device pointers: TINYCLIP_CUDA_AWARE_MPI, else the known switches.

    MPI offers no portable query, so a wrong "yes" would crash inside MPI;
    staging through host memory is always correct, only slower.
    """
    override = os.environ.get("TINYCLIP_CUDA_AWARE_MPI", "").strip()
    if override in ("0", "1"):
        return override == "1"
    switches = (("OMPI_MCA_opal_cuda_support", "true"), ("MPICH_GPU_SUPPORT_ENABLED", "1"),
                ("MV2_USE_CUDA", "1"), ("MPIR_CVAR_ENABLE_GPU", "1"))
    return any(os.environ.get(name, "").strip().lower() == value for name, value in switches)


# ---------------------------------------------------------------------------------
# world(): the job's communicator and the GPU per rank; abort on error, when asked
# ---------------------------------------------------------------------------------

_world = None


def launched_size():
    """The number of processes the MPI launcher says it started (1 when not under a launcher). Raises nothing."""
    for name in _LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def under_launcher():
    """Whether an MPI launcher started this process (its size variable is set, whatever the size). Raises nothing."""
    return any(name in os.environ for name in _LAUNCHER_SIZE_VARIABLES)


def world():
    """The job's communicator: MPI's world under ``mpiexec``, a one-process stand-in otherwise.

    Under MPI, each rank also takes the GPU of its node-local rank (when the
    default backend is cupy). It installs no exception hook: a program that
    wants an error on one rank to end the whole job calls
    ``install_abort_on_error(comm)`` (the ``tinyclip`` command and
    ``tinyclip.train.train`` do). Raises RuntimeError when an MPI launcher
    started the process but mpi4py cannot be imported.
    """
    global _world
    if _world is not None:
        return _world
    if launched_size() <= 1:
        _world = SingleProcess()
        return _world
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise RuntimeError(f"this process was started by an MPI launcher for {launched_size()} processes, "
                           f"but mpi4py cannot be imported ({error}): install it with "
                           "pip install 'tinyclip[mpi]', or run without mpiexec") from error
    _world = Communicator(MPI.COMM_WORLD)
    if backend.default_backend() == "cupy":
        select_gpu(_world)
    return _world


def select_gpu(comm):
    """Make GPU (node-local rank mod GPUs on the node) this process's current CUDA device; returns its id.

    Raises RuntimeError (from ``backend.cupy_module``) when CuPy or a CUDA device is missing.
    """
    cupy = backend.cupy_module()
    device = comm.local_rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    return device


def install_abort_on_error(comm):
    """Make an uncaught exception on this rank print its traceback once, from this rank, and abort the whole job.

    Without it, a rank that dies leaves the others waiting in a collective
    for ever (DESIGN.md: a run never hangs). It replaces ``sys.excepthook``
    and ``threading.excepthook`` of this process, which is why importing
    tinyclip or calling ``world()`` never does it: the ``tinyclip`` command
    and ``tinyclip.train.train`` call it, and a program of one's own may.
    Does nothing for a communicator of one process. Returns whether the
    hooks were installed. Raises nothing.
    """
    if comm.size <= 1:
        return False

    def report_and_abort(kind, value, trace):
        message = "".join(traceback.format_exception(kind, value, trace))
        sys.stderr.write(f"[rank {comm.rank} of {comm.size}] {message}"
                         f"[rank {comm.rank}] aborting all {comm.size} ranks\n")
        sys.stderr.flush()
        comm.abort(1)

    sys.excepthook = report_and_abort
    threading.excepthook = lambda hook: report_and_abort(hook.exc_type, hook.exc_value, hook.exc_traceback)
    return True


# ---------------------------------------------------------------------------------
# Checks every rank agrees on before any message is sent
# ---------------------------------------------------------------------------------

def _agreed_sizes(comm, image_emb, text_emb, log_scale, bias=None, needs_bias=False):
    """Check the inputs on every rank and return every rank's batch size (list of ints).

    A bad input on one rank raises on every rank (its own message there, a
    pointer to it elsewhere) instead of leaving the good ranks waiting for a
    message that never comes.
    """
    problem = None
    try:
        check_inputs(image_emb, text_emb, log_scale, bias, needs_bias)
    except (TypeError, ValueError) as error:
        problem = error
    x = as_array(image_emb)
    rows = x.shape[0] if problem is None else -1
    dim = x.shape[1] if problem is None else -1
    scalars = [float(as_array(log_scale)), 0.0 if bias is None else float(as_array(bias))] \
        if problem is None else [math.nan, math.nan]
    shapes = comm.all_gather_values([rows, dim, int(problem is not None)], numpy.int64)
    values = comm.all_gather_values(scalars, numpy.float64)
    if problem is not None:
        raise problem
    failed = [rank for rank in range(comm.size) if shapes[rank, 2]]
    if failed:
        raise ValueError(f"rank(s) {failed} were given bad input (the error is printed there)")
    if len(set(shapes[:, 1].tolist())) > 1:
        raise ValueError(f"the ranks' embeddings differ in dimension: {shapes[:, 1].tolist()} (by rank)")
    for column, name in ((0, "log_scale"), (1, "bias")):
        if len(set(values[:, column].tolist())) > 1:
            raise ValueError(f"{name} differs between ranks: {values[:, column].tolist()}; the parameters "
                             "must be the same everywhere (broadcast_parameters at the start)")
    return [int(rows) for rows in shapes[:, 0]]


def _tile_for(tile, sizes, like):
    return resolve_tile(tile, max(sizes), like)


# ---------------------------------------------------------------------------------
# Round trips: a chunk visits every other rank, and what it gathered comes home
# ---------------------------------------------------------------------------------

def _pack(arrays):
    """One contiguous 1-D message from several arrays of one dtype."""
    xp = backend.get_array_module(arrays[0])
    return xp.concatenate([array.ravel() for array in arrays]) if len(arrays) > 1 else arrays[0].ravel()


def _unpack(message, shapes):
    pieces, start = [], 0
    for shape in shapes:
        count = math.prod(shape)
        pieces.append(message[start:start + count].reshape(shape))
        start += count
    return pieces


def ring_hops(size, bidirectional=False):
    """(hops towards higher ranks, hops towards lower ranks) that take a chunk to every other rank once.

    Raises nothing.
    """
    if not bidirectional:
        return size - 1, 0
    return size // 2, (size - 1) // 2


class _Trip:
    """One direction of a round trip: the chunk held here, and the accumulator travelling with it."""

    def __init__(self, step, length, cargo, size):
        self.step, self.length = step, length       # ±1, and the number of ranks it visits
        self.cargo, self.gathered = cargo, None
        self.shapes = None                          # of the message on its way here
        # home after the last visit: onwards if that is shorter (a one-way trip is one hop from home),
        # else back the way it came
        onwards = size - length <= length
        self.home_step = step if onwards else -step
        self.home_hops = size - length if onwards else length


def _round_trip(comm, sizes, cargo, cargo_shapes, visit, accumulator=None, bidirectional=False):
    """Take this rank's chunk to every other rank and bring back what it gathered there.

    ``cargo``: this rank's arrays that travel unchanged (the texts first);
    ``cargo_shapes(rows)`` gives their shapes for a chunk of ``rows`` pairs.
    At every rank the chunk reaches, ``visit(cargo, gathered)`` runs, where
    ``gathered`` is the chunk's accumulator: ``accumulator = (shape(rows),
    fresh(rows))`` makes a new one at the chunk's first stop (so the first hop
    carries none) and it travels on with the chunk. Returns the accumulators
    that came home, one per direction (none without an accumulator); the
    caller merges them into its own.

    One-way, a chunk makes D−1 hops to higher ranks and its accumulator one
    more to get home. Both ways, it travels ⌈(D−1)/2⌉ hops up and ⌊(D−1)/2⌋
    down at the same time, so the two directions of each link carry one half
    each, and each accumulator goes home by the shorter way round.
    """
    size, rank = comm.size, comm.rank
    up, down = ring_hops(size, bidirectional)
    trips = [_Trip(step, length, cargo, size) for step, length in ((+1, up), (-1, down)) if length > 0]

    def origin(trip, hop):               # whose chunk this rank holds after ``hop`` hops
        return (rank - hop * trip.step) % size

    for hop in range(1, max((trip.length for trip in trips), default=0) + 1):
        moving = [trip for trip in trips if hop <= trip.length]
        messages = []
        for trip in moving:
            rows = sizes[origin(trip, hop)]
            shapes = cargo_shapes(rows) + ([accumulator[0](rows)] if accumulator and hop >= 2 else [])
            outgoing = trip.cargo + ([trip.gathered] if trip.gathered is not None else [])
            messages.append((_pack(outgoing), (rank + trip.step) % size, (rank - trip.step) % size,
                             (sum(math.prod(shape) for shape in shapes),)))
            trip.shapes = shapes
        for trip, message in zip(moving, comm.exchange(messages) if messages else []):
            pieces = _unpack(message, trip.shapes)
            trip.cargo = pieces[:len(cargo)]
            if accumulator:
                trip.gathered = pieces[len(cargo)] if hop >= 2 else accumulator[1](sizes[origin(trip, hop)])
            visit(trip.cargo, trip.gathered)
    if not accumulator:
        return []

    for hop in range(1, max((trip.home_hops for trip in trips), default=0) + 1):
        moving = [trip for trip in trips if hop <= trip.home_hops]
        messages = []
        for trip in moving:
            arriving = (rank - trip.length * trip.step - hop * trip.home_step) % size
            messages.append((trip.gathered, (rank + trip.home_step) % size, (rank - trip.home_step) % size,
                             accumulator[0](sizes[arriving])))
        for trip, gathered in zip(moving, comm.exchange(messages)):
            trip.gathered = gathered
    return [trip.gathered for trip in trips]


# ---------------------------------------------------------------------------------
# SigLIP: the ring
# ---------------------------------------------------------------------------------

class RingSigLIPLoss(Function):
    @staticmethod
    def forward(ctx, x, y, log_scale, bias, comm, sizes, tile, bidirectional=False):
        """L_r = −1/B Σ_{i ∈ rank r} Σ_j log σ(z_ij l_ij),  l = e^t' X Yᵀ + b:  rank r's rows against every text"""
        tiles = TiledLogits(x, y, log_scale, float(bias), tile, columns=max(sizes))
        xp, batch, dim = tiles.xp, sum(sizes), x.shape[1]
        want_grad = any(ctx.needs_input_grad)
        home_texts = tiles.texts
        grad_images = xp.zeros_like(tiles.images) if want_grad else None
        grad_texts = xp.zeros_like(home_texts) if want_grad else None
        sums = [xp.zeros((), dtype=xp.float64), xp.zeros((), dtype=xp.float64)]   # Σ softplus, Σ σ

        def visit(cargo, grad_visiting, positives=False):
            tiles.use_texts(cargo[0])
            for total, part in zip(sums, siglip_sweep(tiles, grad_images, grad_visiting, positives=positives)):
                total += part

        visit([home_texts], grad_texts, positives=True)                  # the block with the positives
        accumulator = ((lambda rows: (rows, dim)), (lambda rows: xp.zeros((rows, dim), dtype=tiles.work)))
        for grad_home in _round_trip(comm, sizes, [home_texts], lambda rows: [(rows, dim)], visit,
                                     accumulator if want_grad else None, bidirectional):
            grad_texts += grad_home

        tiles.use_texts(home_texts)
        loss_sum, sigma_sum = sums
        loss = loss_sum / batch
        if want_grad:
            grads = tiles.gradients(grad_images, grad_texts, 1.0, log_scale, batch=batch)
            grad_bias = scalar_like(xp, (sigma_sum - x.shape[0]) / batch, bias)
            ctx.save_for_backward(grads[0].astype(x.dtype, copy=False), grads[1].astype(y.dtype, copy=False),
                                  grads[2], grad_bias)
        return xp.asarray(loss, dtype=tiles.work)

    backward = staticmethod(scale_saved_gradients)


def siglip_loss(image_emb, text_emb, log_scale, bias, comm=None, tile=None, bidirectional=False):
    """This rank's share of SigLIP's loss over the global batch, by the ring; see the module docstring.

    ``image_emb``, ``text_emb``: this rank's (b, D) pairs; ``comm``: from
    ``world()`` (the default); ``tile``: rows of the local batch scored at a
    time; ``bidirectional``: send the text chunks both ways round the ring.

    Raises on every rank (never leaving one waiting) what
    ``tinyclip.losses.siglip_loss`` raises for bad input on any rank (the
    rank with the bad input gives its own message), and ValueError when the
    ranks disagree on the dimension, log_scale or bias.
    """
    comm = world() if comm is None else comm
    sizes = _agreed_sizes(comm, image_emb, text_emb, log_scale, bias, needs_bias=True)
    tile = _tile_for(tile, sizes, image_emb)
    log_scale, bias = (scalar_input(value, image_emb, text_emb) for value in (log_scale, bias))
    return RingSigLIPLoss.apply(image_emb, text_emb, log_scale, bias, comm=comm, sizes=sizes, tile=tile,
                                bidirectional=bool(bidirectional))


# ---------------------------------------------------------------------------------
# CLIP: two trips round the ring, or all-gather
# ---------------------------------------------------------------------------------

def _save_clip_gradients(ctx, tiles, inputs, sums, row_stats, column_stats, positives, log_scale, batch):
    """Finish and save a CLIP share's gradients from the sums of (P_rows + P_cols)-products of its rows and texts.

    d L_r / d t' = 1/(2B) [Σ_i (E_softmax l_i· − l_ii) + Σ_j (E_softmax l_·j − l_jj)]: every logit
    is linear in t = e^t', so the derivative of a log-sum-exp is the softmax-weighted mean logit.
    """
    (x, y), xp = inputs, tiles.xp
    grad_images, grad_texts, _ = tiles.gradients(*sums, 0.5, log_scale, batch=batch)
    grad_log_scale = (row_stats.mean_logit().sum() + column_stats.mean_logit().sum()
                      - 2 * positives.sum()) / (2 * batch)
    ctx.save_for_backward(grad_images.astype(x.dtype, copy=False), grad_texts.astype(y.dtype, copy=False),
                          scalar_like(xp, grad_log_scale, log_scale))


class RingCLIPLoss(Function):
    @staticmethod
    def forward(ctx, x, y, log_scale, comm, sizes, tile):
        """L_r = 1/(2B) [Σ_{i ∈ r} (lse_j l_ij − l_ii) + Σ_{j ∈ r} (lse_i l_ij − l_jj)],  l = e^t' X Yᵀ"""
        tiles = TiledLogits(x, y, log_scale, 0.0, tile, columns=max(sizes))
        xp, work, batch, dim = tiles.xp, tiles.work, sum(sizes), x.shape[1]
        want_grad = any(ctx.needs_input_grad)
        home_texts = tiles.texts
        rows_here = x.shape[0]

        # trip 1: rows' log-sum-exp here; columns' travel with their chunk (weighted: d lse/d t' for the scale)
        row_stats = RunningLSE(xp, rows_here, work, weighted=want_grad)
        column_stats = RunningLSE(xp, rows_here, work, weighted=want_grad)

        def fold(cargo, stats, positives=None):
            tiles.use_texts(cargo[0])
            clip_lse_sweep(tiles, row_stats, RunningLSE(xp, 0, work, want_grad, stats=stats), positives)

        positives = xp.empty(rows_here, dtype=work)     # l_ii, the diagonal of the home block's tiles
        fold([home_texts], column_stats.stats, positives)
        fresh_stats = (lambda rows: (3, rows)), (lambda rows: RunningLSE(xp, rows, work).stats)
        for stats in _round_trip(comm, sizes, [home_texts], lambda rows: [(rows, dim)], fold, fresh_stats):
            column_stats.merge(stats)
        row_lse, column_lse = row_stats.lse(), column_stats.lse()                  # (b,), (b,)
        tiles.use_texts(home_texts)
        loss = clip_loss_of(row_lse, column_lse, positives, positives, batch)

        if want_grad:
            # trip 2: each chunk travels with its columns' log-sum-exp and gathers its gradient
            grad_images, grad_texts = xp.zeros_like(tiles.images), xp.zeros_like(home_texts)

            def gradient(cargo, grad_visiting):
                tiles.use_texts(cargo[0])
                clip_gradient_sweep(tiles, row_lse, cargo[1], grad_images, grad_visiting)

            gradient([home_texts, column_lse], grad_texts)
            fresh_grad = (lambda rows: (rows, dim)), (lambda rows: xp.zeros((rows, dim), dtype=work))
            for grad_home in _round_trip(comm, sizes, [home_texts, column_lse],
                                         lambda rows: [(rows, dim), (rows,)], gradient, fresh_grad):
                grad_texts += grad_home
            tiles.use_texts(home_texts)
            _save_clip_gradients(ctx, tiles, (x, y), (grad_images, grad_texts), row_stats, column_stats,
                                 positives, log_scale, batch)
        return xp.asarray(loss, dtype=work)

    backward = staticmethod(scale_saved_gradients)


class GatherCLIPLoss(Function):
    @staticmethod
    def forward(ctx, x, y, log_scale, comm, sizes, tile):
        """The same share as the ring: this rank's rows against all texts, its columns against all images"""
        xp, batch = backend.get_array_module(x, y), sum(sizes)
        want_grad = any(ctx.needs_input_grad)
        all_images, all_texts = comm.all_gather(x), comm.all_gather(y)               # (B, D) each
        rows_side = TiledLogits(x, all_texts, log_scale, 0.0, tile)              # l[r, :]
        columns_side = TiledLogits(y, all_images, log_scale, 0.0, tile)          # l[:, r]ᵀ
        work = rows_side.work
        # each side is a softmax over complete rows: its own rows' gradient is local, the
        # other side's (every rank's) partial gradient is reduce-scattered to its owners
        # this rank's pairs sit on the diagonal that starts at its first row of the global batch
        offset = sum(sizes[:comm.rank])
        sides = []
        for tiles in (rows_side, columns_side):
            stats = RunningLSE(xp, tiles.rows, work, weighted=want_grad)
            positives = xp.empty(tiles.rows, dtype=work)        # l_ii as this side's tiles computed them
            own = xp.zeros_like(tiles.images) if want_grad else None
            everyone = xp.zeros_like(tiles.texts) if want_grad else None
            row_softmax_sweep(tiles, stats, positives, offset, own, everyone)
            sides.append((stats, positives, own, everyone))
        (row_stats, positives, grad_images, texts_partial), (column_stats, column_positives, grad_texts,
                                                              images_partial) = sides
        rows_side.use_texts(y)
        loss = clip_loss_of(row_stats.lse(), column_stats.lse(), positives, column_positives, batch)
        if want_grad:
            grad_images += comm.reduce_scatter(images_partial, sizes)
            grad_texts += comm.reduce_scatter(texts_partial, sizes)
            _save_clip_gradients(ctx, rows_side, (x, y), (grad_images, grad_texts), row_stats, column_stats,
                                 positives, log_scale, batch)
        return xp.asarray(loss, dtype=work)

    backward = staticmethod(scale_saved_gradients)


def clip_loss(image_emb, text_emb, log_scale, comm=None, method="ring", tile=None):
    """This rank's share of CLIP's loss over the global batch; see the module docstring.

    ``method``: "ring" (two trips round the ring, O(b·tile) logits per rank)
    or "gather" (all-gather the embeddings, O(B·D) memory per rank).

    Raises ValueError for another ``method``, and on every rank what
    ``tinyclip.losses.clip_loss`` raises for bad input on any rank, or
    ValueError when the ranks disagree on the dimension or log_scale.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    comm = world() if comm is None else comm
    sizes = _agreed_sizes(comm, image_emb, text_emb, log_scale)
    tile = _tile_for(tile, sizes, image_emb) if method == "ring" else resolve_tile(tile, sum(sizes), image_emb)
    loss = RingCLIPLoss if method == "ring" else GatherCLIPLoss
    return loss.apply(image_emb, text_emb, scalar_input(log_scale, image_emb, text_emb), comm=comm,
                      sizes=sizes, tile=tile)


# ---------------------------------------------------------------------------------
# Data parallel: one set of parameters, every rank's gradient summed
# ---------------------------------------------------------------------------------

def _flat_layout(parameters):
    """The parameters by (backend, dtype): for each group, its total size and every parameter's
    [start, stop) in one flat buffer, so a group crosses the network in one call."""
    groups = {}
    for parameter in parameters:
        groups.setdefault((backend.backend_of(parameter.data), parameter.data.dtype.str), []).append(parameter)
    for group in groups.values():
        offsets = numpy.cumsum([0] + [parameter.data.size for parameter in group]).tolist()
        yield offsets[-1], list(zip(group, offsets[:-1], offsets[1:]))


def all_reduce_gradients(parameters, comm=None):
    """Sum every parameter's gradient over the ranks, in place: one flat buffer (and one call) per dtype.

    Each rank's gradient is that of its share of the loss, so the sum is the
    gradient of the global loss (a sum, not a mean: the shares already carry
    the 1/B of the global batch). A parameter without a gradient counts as zero.
    Raises what MPI raises (an error on one rank ends the job once
    ``install_abort_on_error`` is in place).
    """
    comm = world() if comm is None else comm
    parameters = list(parameters)
    if comm.size == 1:
        return parameters
    for total, layout in _flat_layout(parameters):
        like = layout[0][0].data
        flat = backend.get_array_module(like).zeros(total, dtype=like.dtype)
        for parameter, start, stop in layout:
            if parameter.grad is not None:
                flat[start:stop] = parameter.grad.ravel()
        comm.all_reduce(flat)
        for parameter, start, stop in layout:
            parameter.grad = flat[start:stop].reshape(parameter.data.shape).copy()
    return parameters


def broadcast_parameters(parameters, comm=None, root=0):
    """Copy rank ``root``'s parameter values to every rank (one flat buffer per dtype), so all start equal.

    Raises what MPI raises (for instance for a root that is not a rank).
    """
    comm = world() if comm is None else comm
    parameters = list(parameters)
    if comm.size == 1:
        return parameters
    for total, layout in _flat_layout(parameters):
        flat = backend.get_array_module(layout[0][0].data).concatenate([p.data.ravel() for p, _, _ in layout])
        comm.broadcast(flat, root=root)
        for parameter, start, stop in layout:
            parameter.data[...] = flat[start:stop].reshape(parameter.data.shape)
    return parameters
