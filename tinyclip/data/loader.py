"""Batches for training: a seeded shuffle per epoch, one shard per MPI rank, prefetched on a thread, resumable.

Two kinds of data set fit:

* anything with ``batch(indices) -> (images, captions)``: images an array
  (n, H, W, 3), uint8 or float, and a list of n captions. ``len(dataset)``
  is the number of examples; a data set with no ``__len__`` is unlimited
  (the synthetic shapes, which draw example i from i itself), unless
  ``examples=N`` makes it the first N examples, shuffled like any other.
* a caption set (``tinyclip.data.captions``: ``len``, ``load(i)`` -> PIL
  image or None, ``caption(i)``) together with a ``transform(image, rng=rng)``
  that turns one PIL image into an (H, W, 3) array, for example
  ``functools.partial(random_resized_crop, image_size=224, family="clip")``.

Which examples a batch holds, and how they are augmented, is a pure
function of (seed, epoch, step); the work is split in two:

``BatchOrder``
    which examples make global batch ``step`` of ``epoch``, and which of
    those this rank loads. Epoch e visits the examples in the order
    ``default_rng(SeedSequence([seed, e])).permutation(n)``, cut into
    ``n // batch_size`` global batches; the last, incomplete one is dropped
    so that every step has the same batch size (and so the same loss scale).
    Rank r of D takes a contiguous slice of each global batch, the sizes
    as even as possible, the first ``batch_size % D`` ranks one larger:
    batch 10 on 4 ranks is split 3, 3, 2, 2. Concatenated in rank order the
    slices are the global batch that one process would have trained on.
    An unlimited data set is walked in order, batch k being
    examples [k·B, (k+1)·B): its examples are random already, and the
    epoch stays 0.
    Augmentation draws from ``SeedSequence([seed, epoch, index, 1])``: per
    example and epoch, never per rank, so the same global batch comes out
    whatever the number of ranks.
    Tar shards (``tinyclip.data.shards``, a data set with ``shard_sizes``)
    are streamed instead, as open_clip and webdataset do: rank r of D owns
    shards r, r + D, r + 2D, ... (so no two ranks read the same shard, and
    together they read all), reads them in an order shuffled per epoch
    (``SeedSequence([seed, epoch, rank, 2])``) and each one from start to
    end; its batch ``step`` is the next b of its examples. Every rank takes
    the same number of steps, ``min over ranks of (its examples // b)``;
    what a rank has beyond that in an epoch is dropped. Exact resume holds
    on the same number of ranks (a state records it).

``Loader``
    iterates over the batches without end, epoch after epoch, loading the
    next ones on a background thread (a queue ``prefetch`` deep) so that
    decoding and augmentation overlap the training step. With
    ``workers=N`` > 1 that thread hands each batch to N worker processes
    in N contiguous parts and joins the parts in order: every example is
    computed exactly as one worker computes it (its augmentation depends on
    (seed, epoch, index) only), so the batches are bit for bit those of one
    worker. An exception in a worker reaches the training loop as itself; a
    worker that dies (killed, out of memory) ends the run with an error
    saying so, never a wait. ``state()`` is the position of the next batch,
    a small JSON-able dict; a loader built with ``start=state`` (or after
    ``load_state``) continues exactly there, whatever the number of workers.

Tokenising stays with the training loop: captions come out as strings.
"""

import collections
import concurrent.futures
import multiprocessing
import queue
import signal
import threading

import numpy

STATE_KEYS = ("epoch", "step", "seed", "batch_size", "examples")
SHARDED_STATE_KEYS = STATE_KEYS + ("ranks",)     # streamed shards: the split depends on the number of ranks


def _is_int(value, minimum):
    """An int (Python or NumPy, not bool) of at least ``minimum``."""
    return isinstance(value, (int, numpy.integer)) and not isinstance(value, bool) and value >= minimum


class BatchOrder:
    """Which examples this rank loads at each (epoch, step), and loading them; no state, no threads.

    dataset: see the module docstring; batch_size: the global batch B, over
    all ranks; seed: the shuffle and augmentation seed (a non-negative int);
    rank, world_size: this process's place among the data-parallel ranks;
    transform: for caption sets, ``transform(pil_image, rng=generator)``
    -> (H, W, 3) array; must be None for data sets with ``batch``;
    examples: use only examples [0, examples), None for all of them.
    """

    def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1, transform=None, examples=None):
        name = type(dataset).__name__
        if not _is_int(batch_size, 1):
            raise ValueError(f"loader: batch_size must be a positive int, got {batch_size!r}")
        if not _is_int(seed, 0):
            raise ValueError(f"loader: seed must be a non-negative int, got {seed!r}")
        if not _is_int(world_size, 1):
            raise ValueError(f"loader: world_size must be a positive int, got {world_size!r}")
        if not _is_int(rank, 0) or rank >= world_size:
            raise ValueError(f"loader: rank must be an int in [0, {world_size}), got {rank!r}")
        if batch_size < world_size:
            raise ValueError(f"loader: a global batch of {batch_size} cannot give each of {world_size} ranks "
                             f"an example")
        if hasattr(dataset, "batch"):
            if transform is not None:
                raise ValueError(f"loader: {name} makes its own batches (it has batch()); transform is for "
                                 f"caption sets (load() and caption())")
        elif not (hasattr(dataset, "load") and hasattr(dataset, "caption") and hasattr(dataset, "__len__")):
            raise TypeError(f"loader: {name} is not a data set: it needs batch(indices), or __len__, load(i) "
                            f"and caption(i)")
        elif transform is None:
            raise ValueError(f"loader: {name} gives PIL images of any size; pass a transform to make arrays "
                             f"of them, e.g. functools.partial(random_resized_crop, image_size=..., family=...)")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.transform = transform
        size = len(dataset) if hasattr(dataset, "__len__") else None               # None: unlimited
        if examples is not None and not (_is_int(examples, 1) and (size is None or examples <= size)):
            raise ValueError(f"loader: examples must be an int in [1, {size or 'inf'}] for {name}, "
                             f"got {examples!r}")
        self.examples = size if examples is None else int(examples)
        # this rank's rows of every global batch: the first batch_size % world_size ranks take one more
        base, extra = divmod(self.batch_size, self.world_size)
        self.rows = slice(self.rank * base + min(self.rank, extra),
                          (self.rank + 1) * base + min(self.rank + 1, extra))
        self.shard_sizes = getattr(dataset, "shard_sizes", None)       # set: stream shards (module docstring)
        if self.shard_sizes is not None:
            self.steps_per_epoch = self._sharded_steps(name, examples)
        elif self.examples is None:
            self.steps_per_epoch = None
        else:
            self.steps_per_epoch = self.examples // self.batch_size
            if self.steps_per_epoch == 0:
                raise ValueError(f"loader: {name} has {self.examples} examples, fewer than one batch of "
                                 f"{self.batch_size}")
        self._permutation = (None, None)     # (epoch, its order); one tuple, so one assignment replaces both

    def _sharded_steps(self, name, examples):
        """Steps per epoch of streamed shards: as many as the rank with the fewest batches in its shards has."""
        if examples is not None:
            raise ValueError(f"loader: examples= cannot cut {name}: its shards are streamed whole")
        shards = len(self.shard_sizes)
        if shards < self.world_size:
            raise ValueError(f"loader: {name} has {shards} shards for {self.world_size} ranks; every rank needs a "
                             f"shard of its own (write smaller shards, or use fewer ranks)")
        base, extra = divmod(self.batch_size, self.world_size)
        batches = [int(self.shard_sizes[rank::self.world_size].sum()) // (base + (rank < extra))
                   for rank in range(self.world_size)]
        if min(batches) == 0:
            raise ValueError(f"loader: rank {batches.index(0)}'s shards of {name} hold fewer examples than its "
                             f"share of one batch of {self.batch_size}")
        return min(batches)

    def order(self, epoch):
        """The order in which epoch ``epoch`` visits the examples: a permutation of range(len(dataset)); for
        streamed shards, this rank's examples in the order it reads them."""
        cached_epoch, permutation = self._permutation
        if cached_epoch != epoch:
            permutation = self._stream(epoch) if self.shard_sizes is not None else \
                numpy.random.default_rng(numpy.random.SeedSequence([self.seed, epoch])).permutation(self.examples)
            self._permutation = (epoch, permutation)
        return permutation

    def _stream(self, epoch):
        """This rank's shards in this epoch's order, each from its first example to its last: (examples,) int64."""
        starts = numpy.concatenate([[0], numpy.cumsum(self.shard_sizes)])             # (shards + 1,)
        own = numpy.arange(self.rank, len(self.shard_sizes), self.world_size)
        rng = numpy.random.default_rng(numpy.random.SeedSequence([self.seed, epoch, self.rank, 2]))
        return numpy.concatenate([numpy.arange(starts[shard], starts[shard + 1]) for shard in rng.permutation(own)])

    def global_indices(self, epoch, step):
        """The examples of global batch ``step`` in ``epoch``, over all ranks: (batch_size,) int64.

        Not for streamed shards, where each rank reads its own (``indices``).
        """
        if self.shard_sizes is not None:
            raise ValueError("loader: streamed shards have no global order; each rank reads its own shards")
        start = step * self.batch_size
        if self.examples is None:
            return numpy.arange(start, start + self.batch_size, dtype=numpy.int64)
        return self.order(epoch)[start:start + self.batch_size]

    def indices(self, epoch, step):
        """The examples this rank loads at (epoch, step): its slice of the global batch, as a list of ints."""
        if self.shard_sizes is not None:
            size = self.rows.stop - self.rows.start
            return self.order(epoch)[step * size:(step + 1) * size].tolist()
        return self.global_indices(epoch, step)[self.rows].tolist()

    def next_position(self, epoch, step):
        """The (epoch, step) after this one."""
        if self.steps_per_epoch is not None and step + 1 == self.steps_per_epoch:
            return epoch + 1, 0
        return epoch, step + 1

    def load(self, epoch, step):
        """This rank's batch at (epoch, step): (images (b, H, W, 3), captions: list of b strings)."""
        images, captions, _ = self.load_examples(epoch, self.indices(epoch, step))
        return images, captions

    def load_examples(self, epoch, indices):
        """The examples ``indices`` as loaded in ``epoch``: (images (n, H, W, 3), n captions, skipped), where
        skipped lists the indices whose image could not be read (a substitute took their place). Each example
        depends on (seed, epoch, its index) only, so any split of a batch into parts joins back into it."""
        if self.transform is not None:
            return self._transformed_batch(epoch, indices)
        images, captions = self.dataset.batch(indices)
        if len(images) != len(indices) or len(captions) != len(indices):
            raise ValueError(f"loader: {type(self.dataset).__name__}.batch gave {len(images)} images and "
                             f"{len(captions)} captions for {len(indices)} indices")
        return images, list(captions), []

    def _transformed_batch(self, epoch, indices):
        images, captions, skipped = [], [], []
        for index in indices:
            image, caption = self._readable_pair(index, skipped)
            # the trailing 1 keeps these streams apart from the shuffle's: SeedSequence pads short entropy with
            # zeros, so [seed, epoch, 0] would be the shuffle's [seed, epoch]
            rng = numpy.random.default_rng(numpy.random.SeedSequence([self.seed, epoch, index, 1]))
            images.append(self.transform(image, rng=rng))
            captions.append(caption)
        return numpy.stack(images), captions, skipped          # (b, H, W, 3)

    def _readable_pair(self, index, skipped):
        """(image, caption) of pair ``index``, or of the next pair with a readable image when it has none
        (the unreadable ones tried are appended to ``skipped``).

        The substitute depends only on the index, so every rank and every
        resumed run makes the same choice.
        """
        for offset in range(self.examples):
            substitute = (index + offset) % self.examples
            image = self.dataset.load(substitute)
            if image is not None:
                return image, self.dataset.caption(substitute)
            if offset == 0:
                skipped.append(index)
        raise ValueError(f"loader: no image of {self.dataset!r} could be read")


class _WorkerError:
    """An exception raised on the loading thread, on its way to the consumer."""

    def __init__(self, error):
        self.error = error


def _with_captions(batch, caption_transform):
    """(images, captions, skipped) with the captions put through ``caption_transform`` (None: kept as they are)."""
    if caption_transform is None:
        return batch
    images, captions, skipped = batch
    return images, caption_transform(captions), skipped


def _fill(order, epoch, step, batches, stop, pool, caption_transform=None):
    """The loading thread: put this rank's batches from (epoch, step) on into ``batches`` until ``stop`` is set.

    With a ``pool`` (a ``_WorkerPool``), the next batch is already being
    decoded by the workers while this one is collected. A module function
    that holds no reference to the Loader, so a loader that is dropped
    without close() is still collected (and its __del__ stops this thread).
    """
    try:
        if pool is None:
            while not stop.is_set():
                batches.put(_with_captions(order.load_examples(epoch, order.indices(epoch, step)), caption_transform))
                epoch, step = order.next_position(epoch, step)
            return
        pending = collections.deque()
        while not stop.is_set():
            while len(pending) < 2:
                pending.append(pool.submit(epoch, order.indices(epoch, step)))
                epoch, step = order.next_position(epoch, step)
            batches.put(_with_captions(pool.gather(pending.popleft()), caption_transform))
    except BaseException as error:   # anything, or the consumer would wait for a batch that never comes
        batches.put(_WorkerError(error))


# ---- worker processes -------------------------------------------------------------------------------------

_worker_order = None          # in a worker process: the BatchOrder it loads examples of


def _start_worker(order):
    global _worker_order
    _worker_order = order
    # Ctrl-C reaches the whole process group; the training loop finishes its step and saves, so the workers
    # must outlive it rather than die with a KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load_part(epoch, indices):
    return _worker_order.load_examples(epoch, indices)


class WorkerDied(RuntimeError):
    """A loader worker process ended without an answer (killed by a signal, out of memory)."""


class _WorkerPool:
    """``workers`` processes that load contiguous parts of each batch; the parts join into the batch in order.

    The processes are forked where the OS can (Linux), so the data set and
    transform are shared as they are, without pickling; elsewhere they are
    started fresh and get a pickled copy of the BatchOrder.
    """

    def __init__(self, order, workers):
        self.workers = workers
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker, initargs=(order,))
        # the executor forks all its processes at the first submit: do it now, on the calling thread, rather
        # than later on the loading thread while the training loop runs (a fork copies locks others may hold)
        self.executor.submit(int).result()

    def submit(self, epoch, indices):
        """Futures of the parts of one batch (``workers`` contiguous parts, sizes as even as possible)."""
        return [self.executor.submit(_load_part, epoch, part.tolist())
                for part in numpy.array_split(numpy.asarray(indices), self.workers) if len(part)]

    @staticmethod
    def gather(parts):
        """The batch of the parts of ``submit``: images joined along the batch axis, captions and skipped
        indices in order."""
        try:
            loaded = [part.result() for part in parts]
        except concurrent.futures.process.BrokenProcessPool:
            raise WorkerDied("loader: a worker process ended without finishing its batch (killed by a signal or "
                             "out of memory?); the run stops here") from None
        return (numpy.concatenate([images for images, _, _ in loaded]),
                [caption for _, captions, _ in loaded for caption in captions],
                [index for _, _, skipped in loaded for index in skipped])

    def shutdown(self, wait):
        self.executor.shutdown(wait=wait, cancel_futures=True)


class _Prefetch:
    """One run of the loading thread (and its worker processes) with its own queue and stop flag; stopping it
    never blocks on the queue."""

    def __init__(self, order, epoch, step, depth, workers, caption_transform=None):
        self.batches = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        # the workers are forked here, on the calling thread, before the loading thread exists
        self.pool = _WorkerPool(order, workers) if workers > 1 else None
        # a daemon thread: one stuck in a slow read cannot keep the interpreter from exiting
        self.thread = threading.Thread(target=_fill, args=(order, epoch, step, self.batches, self.stop_event,
                                                           self.pool, caption_transform),
                                       name="tinyclip-loader", daemon=True)
        self.thread.start()

    def get(self):
        item = self.batches.get()        # never waits forever: _fill puts a batch or an error before it ends
        if isinstance(item, _WorkerError):
            raise item.error     # the same exception, its traceback still showing where it was raised
        return item

    def stop(self, wait):
        self.stop_event.set()
        # empty the queue so a thread blocked in put() gets its place, sees the flag and returns
        while True:
            try:
                self.batches.get_nowait()
            except queue.Empty:
                break
        if wait:
            self.thread.join()
        if self.pool is not None:
            self.pool.shutdown(wait)


class Loader:
    """This rank's training batches, epoch after epoch without end, loaded ahead on a background thread.

    ``for images, captions in loader`` (or ``next(loader)``): images as the
    data set or transform makes them, (b, H, W, 3); captions, b strings, or
    what ``caption_transform`` makes of the batch's list of them (a tokenizer:
    the captions are then tokenized on the loading thread, beside the
    training step, instead of in it; never in a worker process, so it need not
    pickle). Arguments as ``BatchOrder``, and: prefetch, how many batches to load
    ahead (0: load in the calling thread, handy under a debugger); start, a
    ``state()`` to resume from; workers, how many processes decode (1: the
    loading thread itself). With workers > 1 a data set with ``batch``
    must give each example independently of the others asked with it.
    Close it (or use ``with``) to stop the thread and the workers.
    """

    def __init__(self, dataset, batch_size, *, seed=0, rank=0, world_size=1, transform=None, examples=None,
                 prefetch=2, start=None, workers=1, caption_transform=None):
        self._prefetch = None            # first, so that __del__ works even when the checks below fail
        if not _is_int(prefetch, 0):
            raise ValueError(f"loader: prefetch must be a non-negative int, got {prefetch!r}")
        if not _is_int(workers, 1):
            raise ValueError(f"loader: workers must be a positive int, got {workers!r}")
        if workers > 1 and prefetch == 0:
            raise ValueError("loader: workers > 1 load ahead of the training loop; they need prefetch >= 1")
        self.order = BatchOrder(dataset, batch_size, seed, rank, world_size, transform, examples)
        if caption_transform is not None and not callable(caption_transform):
            raise ValueError(f"loader: caption_transform must be callable, got {caption_transform!r}")
        self.prefetch = prefetch
        self.workers = workers
        self.caption_transform = caption_transform
        self.epoch, self.step = 0, 0     # the position of the next batch next() returns
        self.last_skipped = []           # indices of the last batch's examples whose image could not be read
        self._closed = False
        if start is not None:
            self.load_state(start)

    @property
    def steps_per_epoch(self):
        """Global batches per epoch (None for an unlimited data set)."""
        return self.order.steps_per_epoch

    def state(self):
        """Where the next batch comes from, as a JSON-able dict; the same on every rank."""
        state = {"epoch": self.epoch, "step": self.step, "seed": self.order.seed,
                 "batch_size": self.order.batch_size, "examples": self.order.examples}
        if self.order.shard_sizes is not None:
            state["ranks"] = self.order.world_size
        return state

    def load_state(self, state):
        """Continue from ``state()`` of a loader with the same seed, batch size and number of examples.

        The number of ranks may differ (a state names a global batch), except
        for streamed shards, where each rank's examples depend on it.
        """
        keys = STATE_KEYS if self.order.shard_sizes is None else SHARDED_STATE_KEYS
        if not isinstance(state, dict) or set(state) != set(keys):
            raise ValueError(f"loader: a state is a dict with keys {keys}, got {state!r}")
        for key in keys[2:]:
            if state[key] != self.state()[key]:
                raise ValueError(f"loader: cannot resume a loader with {key}={state[key]!r} as one with "
                                 f"{key}={self.state()[key]!r}: the order of examples would differ")
        epoch, step = state["epoch"], state["step"]
        steps = self.steps_per_epoch
        if not (_is_int(epoch, 0) and _is_int(step, 0) and (steps is None or step < steps)):
            raise ValueError(f"loader: no position epoch={epoch!r}, step={step!r} in epochs of {steps} steps")
        self._stop_thread(wait=True)
        self.epoch, self.step = int(epoch), int(step)

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise RuntimeError("loader: next() on a closed loader")
        if self.prefetch == 0:
            batch = _with_captions(self.order.load_examples(self.epoch, self.order.indices(self.epoch, self.step)),
                                   self.caption_transform)
        else:
            if self._prefetch is None:
                self._prefetch = _Prefetch(self.order, self.epoch, self.step, self.prefetch, self.workers,
                                           self.caption_transform)
            try:
                batch = self._prefetch.get()
            except BaseException:
                # the thread has ended (or the wait was interrupted); the next call starts a fresh one at the
                # same position, so a failed batch is tried again
                self._stop_thread(wait=True)
                raise
        images, captions, self.last_skipped = batch   # skipped: unreadable images, for the trainer's counts
        self.epoch, self.step = self.order.next_position(self.epoch, self.step)
        return images, captions

    def _stop_thread(self, wait):
        if self._prefetch is not None:
            self._prefetch.stop(wait)
            self._prefetch = None

    def close(self):
        """Stop the loading thread and the workers and wait for them to end; the loader gives no more batches."""
        self._stop_thread(wait=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        # no join here: __del__ may run while the interpreter shuts down, when joining a thread can hang
        self._stop_thread(wait=False)
