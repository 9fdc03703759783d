"""Every array of a training step stays on the device: CuPy's rules, checked without a GPU.

The "cupy" backend is the stand-in of tests/strict_backend.py: any NumPy
function called on one of its arrays, and any host array mixed into its
arithmetic, raises TypeError, as both do with CuPy. On it run a forward and
backward of the ``tiny`` model in both families, both fused losses with
their options and their references, an AdamW and an SGD step, the
distributed losses (the one-process stand-in and a ring of three threads),
MPI staging on ``COMM_SELF``, the evaluation helpers and a checkpoint round
trip; every result must still be a device array, and every number must be
the NumPy backend's (the stand-in runs NumPy's kernels and draws NumPy's
random numbers, so the two agree to rounding).
"""

import math
import threading

import numpy
import pytest

import tinyclip as tc
from tinyclip import backend, checkpoint, distributed, evaluate, losses, optim
from tinyclip.data import transforms
from tinyclip.models import CLIP, preset

from . import strict_backend
from .strict_backend import DeviceArray

SIGLIP_TINY = dict(class_token=False, vision_pre_norm=False, patch_bias=True, vision_pooling="map",
                   vision_projection=False, embed_dim=16, causal=False, text_pooling="last",
                   text_projection_bias=True, activation="gelu_tanh", ln_eps=1e-6, init_bias=-10.0)
FAMILIES = {"clip": preset("tiny"), "siglip": preset("tiny", **SIGLIP_TINY)}


@pytest.fixture
def device(monkeypatch):
    """The array module behind the backend name "cupy" for this test: the strict stand-in."""
    return strict_backend.install(monkeypatch)


def assert_on_device(*arrays):
    for array in arrays:
        assert isinstance(array, DeviceArray), f"a {type(array).__name__} came back where a device array belongs"


def unit_rows(seed, shape):
    rows = numpy.random.default_rng(seed).standard_normal(shape)
    return rows / numpy.linalg.norm(rows, axis=1, keepdims=True)


def test_the_stand_in_refuses_what_cupy_refuses(device):
    x = device.arange(4.0)
    for numpy_call in (lambda: numpy.exp(x), lambda: numpy.zeros_like(x), lambda: numpy.concatenate([x, x]),
                       lambda: numpy.add.at(x, [0], 1.0), lambda: x * numpy.ones(4), lambda: numpy.ones(4) + x,
                       lambda: device.concatenate([x, numpy.ones(4)]), lambda: device.exp(x, out=numpy.ones(4))):
        with pytest.raises(TypeError, match="device array"):
            numpy_call()
    device.add.at(x, numpy.array([0, 0]), device.ones(2))          # host indices are fine, as in CuPy
    results = [x + 1, 2 * x, x.sum(), x.max(axis=0), device.exp(x), device.vdot(x, x), x[numpy.array([1, 2])],
               device.einsum("i,i->", x, x), x.astype(numpy.float32), device.random.default_rng(0).random(3)]
    assert_on_device(*results)
    assert results[2].ndim == 0                                     # reductions give 0-d arrays, not scalars
    assert float(x[0]) == 2.0 and backend.to_numpy(x).__class__ is numpy.ndarray


def model_inputs(config, seed=0, batch=4):
    rng = numpy.random.default_rng(seed)
    images = rng.uniform(-1, 1, (batch, config.image_size, config.image_size, 3)).astype(numpy.float32)
    tokens = rng.integers(1, config.vocab_size - 1, (batch, config.context_length))
    tokens[:, -2] = config.eos_id            # the end-of-text id (the largest) before a padding position
    tokens[:, -1] = 0
    return images, tokens


def training_step(config, backend_name, make_optimizer):
    """One step of the tiny model on a backend: (loss, gradient norm, parameter name -> (value, gradient))."""
    model = CLIP(config, backend=backend_name, seed=0)
    optimizer = make_optimizer(model)
    images, tokens = (backend.asarray(array, backend_name) for array in model_inputs(config))
    image_emb, text_emb, log_scale, bias = model(images, tokens)
    if bias is None:
        loss = losses.clip_loss(image_emb, text_emb, log_scale, tile=3)
    else:
        loss = losses.siglip_loss(image_emb, text_emb, log_scale, bias, tile=3, keep_negatives=0.5)
    loss.backward()
    distributed.all_reduce_gradients(model.parameters(), distributed.SingleProcess())
    norm = optim.clip_grad_norm(model.parameters(), 0.5)
    optimizer.step()
    state = {name: (p.data, p.grad) for name, p in model.named_parameters()}
    return loss.data, norm, state, optimizer


OPTIMIZERS = {
    "adamw": lambda model: optim.AdamW(optim.param_groups_for_decay(model.named_parameters(), 0.1), lr=1e-2),
    "sgd": lambda model: optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_training_step_of_the_tiny_model_stays_on_the_device(device, family, optimizer):
    loss, norm, state, used = training_step(FAMILIES[family], "cupy", OPTIMIZERS[optimizer])
    expected_loss, expected_norm, expected_state, _ = training_step(FAMILIES[family], "numpy", OPTIMIZERS[optimizer])
    assert_on_device(loss, *(array for pair in state.values() for array in pair))
    assert_on_device(*(value for entry in used.state.values() for value in entry.values() if hasattr(value, "shape")))
    numpy.testing.assert_allclose(backend.to_numpy(loss), expected_loss, rtol=1e-6)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    for name, (value, grad) in state.items():
        numpy.testing.assert_allclose(backend.to_numpy(value), expected_state[name][0], rtol=1e-5, atol=1e-6,
                                      err_msg=name)
        numpy.testing.assert_allclose(backend.to_numpy(grad), expected_state[name][1], rtol=1e-5, atol=1e-7,
                                      err_msg=name)
    restored = OPTIMIZERS[optimizer](CLIP(FAMILIES[family], backend="cupy", seed=0))
    restored.load_state_dict(used.state_dict())
    assert_on_device(*(value for entry in restored.state.values() for value in entry.values()
                       if hasattr(value, "shape")))


def test_host_images_and_tokens_move_to_the_models_device(device):
    model = CLIP(FAMILIES["clip"], backend="cupy", seed=0)
    images, tokens = model_inputs(FAMILIES["clip"])
    image_emb, text_emb, _, _ = model(images, tokens)
    assert_on_device(image_emb.data, text_emb.data)
    on_device = model(*(backend.asarray(array, "cupy") for array in (images, tokens)))
    numpy.testing.assert_array_equal(backend.to_numpy(image_emb.data), backend.to_numpy(on_device[0].data))


LOSS_CASES = {
    "clip": lambda x, y, t, b: losses.clip_loss(x, y, t, tile=2),
    "clip-reference": lambda x, y, t, b: losses.clip_loss_reference(x, y, t),
    "siglip": lambda x, y, t, b: losses.siglip_loss(x, y, t, b, tile=2),
    "siglip-random-negatives": lambda x, y, t, b: losses.siglip_loss(x, y, t, b, tile=2, keep_negatives=0.4),
    "siglip-hard-negatives": lambda x, y, t, b: losses.siglip_loss(x, y, t, b, keep_negatives=0.4, negatives="hard"),
    "siglip-reference": lambda x, y, t, b: losses.siglip_loss_reference(
        x, y, t, b, mask=losses.siglip_negative_mask(x, y, t, b, 0.4, "easy")),
    "one-process-siglip": lambda x, y, t, b: distributed.siglip_loss(x, y, t, b, distributed.SingleProcess(), tile=2),
    "one-process-clip-ring": lambda x, y, t, b: distributed.clip_loss(x, y, t, distributed.SingleProcess(), tile=2),
    "one-process-clip-gather": lambda x, y, t, b: distributed.clip_loss(x, y, t, distributed.SingleProcess(),
                                                                        method="gather", tile=2),
}


def loss_and_gradients(case, backend_name, dtype):
    inputs = [tc.tensor(backend.asarray(value, backend_name, dtype), requires_grad=True)
              for value in (unit_rows(1, (5, 3)), unit_rows(2, (5, 3)), numpy.log(7.0), -2.0)]
    value = LOSS_CASES[case](*inputs)
    value.backward()
    return [value.data] + [tensor.grad for tensor in inputs if tensor.grad is not None]


@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_every_loss_and_its_gradients_stay_on_the_device(device, case, dtype):
    got = loss_and_gradients(case, "cupy", dtype)
    expected = loss_and_gradients(case, "numpy", dtype)
    assert_on_device(*got)
    tolerance = {"float64": dict(rtol=1e-12, atol=1e-14), "float16": dict(rtol=2e-3, atol=1e-5)}[dtype]
    for array, reference in zip(got, expected):
        numpy.testing.assert_allclose(backend.to_numpy(array), reference, **tolerance)


class ThreadedWorld:
    """``size`` ranks as threads of this process, exchanging device arrays the way the MPI Communicator does."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.posted = [None] * size

    def everyone(self, rank, value):
        """Every rank's ``value``, in rank order (a collective: all ranks call it)."""
        self.barrier.wait()
        self.posted[rank] = value
        self.barrier.wait()
        values = list(self.posted)
        self.barrier.wait()
        return values

    def run(self, work):
        """``work(comm)`` on every rank at once; the results in rank order."""
        results, errors = [None] * self.size, []

        def main(rank):
            try:
                results[rank] = work(ThreadedComm(self, rank))
            except BaseException as error:   # handed to the main thread, which raises it
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


class ThreadedComm:
    """One rank of a ThreadedWorld, with the Communicator's methods that the losses use."""

    cuda_aware = False

    def __init__(self, world, rank):
        self.world, self.rank, self.size, self.local_rank = world, rank, world.size, rank

    def exchange(self, messages):
        # sent arrays are copied before anyone reads them: a sender may reuse its buffer once exchange returns
        posted = self.world.everyone(self.rank, [(destination, array.copy())
                                                 for array, destination, _, _ in messages])
        taken, received = [0] * self.size, []
        for _, _, source, shape in messages:
            array = [sent for destination, sent in posted[source] if destination == self.rank][taken[source]]
            taken[source] += 1
            assert array.size == math.prod(shape)
            received.append(array.reshape(shape))
        return received

    def all_gather(self, array):
        return backend.get_array_module(array).concatenate(self.world.everyone(self.rank, array.copy()))

    def all_gather_values(self, values, dtype):
        return numpy.asarray(self.world.everyone(self.rank, list(values)), dtype=dtype)

    def reduce_scatter(self, array, counts):
        total = sum(self.world.everyone(self.rank, array.copy()))
        start = sum(counts[:self.rank])
        return total[start:start + counts[self.rank]]


RING_CASES = {
    "siglip": (lambda *a, **k: distributed.siglip_loss(*a, **k), True),
    "siglip-bidirectional": (lambda *a, **k: distributed.siglip_loss(*a, bidirectional=True, **k), True),
    "clip-ring": (lambda *a, **k: distributed.clip_loss(*a, method="ring", **k), False),
    "clip-gather": (lambda *a, **k: distributed.clip_loss(*a, method="gather", **k), False),
}


@pytest.mark.parametrize("case", RING_CASES)
def test_the_ring_across_three_ranks_stays_on_the_device(device, case):
    loss, has_bias = RING_CASES[case]
    images, texts, sizes = unit_rows(3, (7, 4)), unit_rows(4, (7, 4)), [3, 2, 2]
    starts = numpy.cumsum([0] + sizes)

    def share(comm):
        rows = slice(starts[comm.rank], starts[comm.rank + 1])
        inputs = [tc.tensor(backend.asarray(value, "cupy"), requires_grad=True)
                  for value in (images[rows], texts[rows], numpy.log(5.0), -1.0)[:4 if has_bias else 3]]
        value = loss(*inputs, comm=comm, tile=2)
        value.backward()
        assert_on_device(value.data, *(tensor.grad for tensor in inputs))
        return [backend.to_numpy(array) for array in [value.data] + [tensor.grad for tensor in inputs]]

    shares = ThreadedWorld(3).run(share)
    whole = [tc.tensor(numpy.asarray(value), requires_grad=True) for value in (images, texts, numpy.log(5.0), -1.0)]
    expected = (losses.siglip_loss(*whole) if has_bias else losses.clip_loss(*whole[:3]))
    expected.backward()
    assert sum(float(result[0]) for result in shares) == pytest.approx(float(expected.data), rel=1e-12)
    for index in (1, 2):
        numpy.testing.assert_allclose(numpy.concatenate([result[index] for result in shares]),
                                      whole[index - 1].grad, rtol=1e-10, atol=1e-12)
    for index in range(3, len(shares[0])):
        assert sum(float(result[index]) for result in shares) == pytest.approx(float(whole[index - 1].grad),
                                                                              rel=1e-10)


@pytest.mark.parametrize("cuda_aware", [False, True], ids=["staged", "cuda-aware"])
def test_mpi_messages_of_device_arrays(device, monkeypatch, cuda_aware):
    mpi = pytest.importorskip("mpi4py.MPI")
    monkeypatch.setenv("TINYCLIP_CUDA_AWARE_MPI", "1" if cuda_aware else "0")
    comm = distributed.Communicator(mpi.COMM_SELF)
    rows = backend.asarray(numpy.arange(12.0).reshape(4, 3), "cupy")
    every_other = rows[::2]                                          # not contiguous: sent through a copy
    (received,) = comm.exchange([(every_other, 0, 0, (2, 3))])
    gathered = comm.all_gather(every_other)
    scattered = comm.reduce_scatter(rows, [4])
    reduced = comm.all_reduce(rows.T)
    broadcast = comm.broadcast(every_other)
    assert_on_device(received, gathered, scattered, reduced, broadcast)
    for array in (received, gathered, broadcast):
        numpy.testing.assert_array_equal(backend.to_numpy(array).reshape(2, 3), [[0, 1, 2], [6, 7, 8]])
    numpy.testing.assert_array_equal(backend.to_numpy(scattered), numpy.arange(12.0).reshape(4, 3))
    numpy.testing.assert_array_equal(backend.to_numpy(reduced), numpy.arange(12.0).reshape(4, 3).T)


def fake_tokenizer(texts, context_length):
    """Distinct ids per text, the end-of-text id (the largest of the tiny preset) last: (len(texts), length)."""
    ids = numpy.array([[(len(text) * 7 + 3 * position) % 60 + 1 for position in range(context_length)]
                       for text in texts])
    ids[:, -1] = 63
    return ids


def test_evaluation_runs_on_the_device(device):
    pixels = numpy.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=numpy.uint8)
    captions = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    embeddings = {}
    for name in ("cupy", "numpy"):
        model = CLIP(preset("tiny"), backend=name, seed=0)
        embeddings[name] = (evaluate.encode_images(model, pixels, batch_size=4),
                            evaluate.encode_classes(model, fake_tokenizer, ["x", "yy", "zzz"], ("{} one", "a {} two")),
                            evaluate.encode_texts(model, fake_tokenizer, captions, batch_size=4))
    assert_on_device(*embeddings["cupy"], transforms.normalize(backend.asarray(pixels, "cupy")))
    for got, expected in zip(embeddings["cupy"], embeddings["numpy"]):
        numpy.testing.assert_allclose(backend.to_numpy(got), expected, rtol=1e-6, atol=1e-7)

    def metrics(image_emb, class_emb, text_emb):
        return [evaluate.zeroshot_accuracy(image_emb, class_emb, [0, 1, 2, 0, 1, 2], k=(1, 2)),
                evaluate.retrieval_recall(image_emb, text_emb, ks=(1, 3)),
                evaluate.retrieval_recall(image_emb[:3], text_emb[:4], ks=1, text_to_image=[0, 1, 2, 1], chunk_size=2),
                evaluate.relation_accuracy(image_emb, text_emb, text_emb[::-1])]

    # the same embeddings on either side, so that no rounding can turn a tie
    assert metrics(*embeddings["cupy"]) == metrics(*(backend.to_numpy(array) for array in embeddings["cupy"]))


def test_a_checkpoint_round_trip_lands_on_the_device(device, tmp_path):
    model = CLIP(FAMILIES["siglip"], backend="cupy", seed=5)
    checkpoint.save(model, tmp_path / "model")
    loaded = checkpoint.load(tmp_path / "model", backend="cupy")
    for (name, original), (_, copy) in zip(model.named_parameters(), loaded.named_parameters()):
        assert_on_device(copy.data)
        numpy.testing.assert_array_equal(backend.to_numpy(copy.data), backend.to_numpy(original.data), err_msg=name)
