"""The ops that cut their element-wise work into row blocks give the one-thread result bit for bit.

GELU (tanh and exact), QuickGELU, layer norm, the attention softmax,
AdamW, im2col (``patches``), batch norm and the pixel normalisation hand
their element-wise work to ``parallel.map_rows``. Here every one
of them, forward and backward, runs at TINYCLIP_THREADS = 1, 2 and 3 with
``MIN_PARALLEL_SIZE`` lowered to 0, so that these small odd shapes really
are cut (a spy checks that each op's row function went through the pool),
and must return the same bytes as with one thread; so must two whole
training steps of small models (a ViT with each activation, and the CNN
tower). A row function that let one row's result depend on another row
(a reduction over the whole block instead of each row) fails these tests.
"""

import numpy
import pytest

import tinyclip as tc
from tinyclip import functional as F, parallel

THREADS = (1, 2, 3)


@pytest.fixture
def row_functions(monkeypatch):
    """Cut every array, however small, and record the name of each row function given to map_rows."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SIZE", 0)
    names = []
    cut = parallel.map_rows

    def spy(fn, out, *arrays, threads=None):
        names.append(getattr(fn, "func", fn).__name__)     # the losses pass functools.partial rows
        return cut(fn, out, *arrays, threads=threads)

    monkeypatch.setattr(parallel, "map_rows", spy)
    return names


def random(shape, seed, dtype=numpy.float32):
    return (numpy.random.default_rng(seed).standard_normal(shape) * 2).astype(dtype)


def forward_and_backward(op, inputs, seed):
    """(output, gradient of every input) for a random cotangent, as bytes."""
    tensors = [tc.Tensor(a.copy(), requires_grad=True) for a in inputs]
    out = op(*tensors)
    out.backward(random(out.shape, seed, out.dtype))
    return [out.data.tobytes()] + [t.grad.tobytes() for t in tensors]


def attention(causal):
    def op(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, causal=causal)
    return op


BATCH_NORM_ROWS = {"_subtract_rows", "_batch_norm_rows", "_scale_rows", "_batch_norm_backward_rows"}
RUNNING = (numpy.linspace(-1, 1, 5).astype(numpy.float32), numpy.linspace(0.5, 2, 5).astype(numpy.float32))

# (op, input shapes, the row functions it must hand to the pool)
OPS = {
    "gelu tanh": (lambda x: F.gelu(x, approximate="tanh"), [(3, 5, 7)], {"_gelu_tanh_rows", "_gelu_tanh_backward_rows"}),
    "gelu exact": (lambda x: F.gelu(x, approximate="none"), [(5, 11)], {"_gelu_rows", "_gelu_backward_rows"}),
    "quick gelu": (F.quick_gelu, [(7, 3, 5)], {"_quick_gelu_rows", "_quick_gelu_backward_rows"}),
    "layer norm": (F.layer_norm, [(3, 7, 9), (9,), (9,)], {"_layer_norm_rows", "_layer_norm_backward_rows"}),
    "layer norm, no affine": (F.layer_norm, [(11, 6)], {"_layer_norm_rows", "_layer_norm_backward_rows"}),
    # a (D,) gain whose length equals the row count N: it must still be passed whole, not cut
    "layer norm, D = N": (F.layer_norm, [(5, 5), (5,), (5,)], {"_layer_norm_rows", "_layer_norm_backward_rows"}),
    "attention": (attention(False), [(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)],
                  {"_softmax_rows", "_softmax_backward_rows"}),
    "causal attention": (attention(True), [(2, 3, 7, 4)] * 3, {"_softmax_rows", "_softmax_backward_rows"}),
    # the CNN tower's stage: conv 3x3, stride 2, padding 1; and overlapping windows without padding
    "patches, padded": (lambda x: F.patches(x, 3, stride=2, padding=1), [(5, 7, 6, 3)],
                        {"_patches_rows", "_patches_backward_rows"}),
    "patches, overlapping": (lambda x: F.patches(x, 3, stride=1, padding=0), [(4, 6, 5, 2)],
                             {"_patches_rows", "_patches_backward_rows"}),
    "batch norm": (F.batch_norm, [(3, 4, 5, 6), (6,), (6,)], BATCH_NORM_ROWS),
    # no affine, and C = N rows: the (C,) statistics must be passed whole, not cut
    "batch norm, no affine, C = N": (F.batch_norm, [(6, 6)], BATCH_NORM_ROWS),
    "batch norm, evaluation": (lambda x, w, b: F.batch_norm(x, w, b, running=RUNNING, training=False),
                               [(4, 3, 5, 5), (5,), (5,)], BATCH_NORM_ROWS),
}


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_forward_and_backward_are_bit_identical_at_every_thread_count(name, dtype, row_functions, monkeypatch):
    op, shapes, expected = OPS[name]
    inputs = [random(shape, seed, dtype) for seed, shape in enumerate(shapes)]
    results = {}
    for threads in THREADS:
        monkeypatch.setenv(parallel.THREADS_ENV, str(threads))
        row_functions.clear()
        results[threads] = forward_and_backward(op, inputs, seed=99)
        assert expected <= set(row_functions), name
    for threads in THREADS[1:]:
        assert results[threads] == results[1], f"{name}: {threads} threads differ from 1"


def test_adamw_steps_are_bit_identical_at_every_thread_count(row_functions, monkeypatch):
    shapes = [(7, 5), (13,), (), (3, 4, 2)]           # a matrix, a vector, a scalar (not cut), a 3-D array

    def steps():
        params = [tc.Tensor(random(shape, seed), requires_grad=True) for seed, shape in enumerate(shapes)]
        optimizer = tc.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
        for step in range(3):
            for seed, p in enumerate(params):
                p.grad = random(p.shape, 10 * step + seed + 50)
            optimizer.step()
        moments = [optimizer.state[p][name] for p in params for name in ("exp_avg", "exp_avg_sq")]
        return [a.tobytes() for a in [p.data for p in params] + moments]

    results = {}
    for threads in THREADS:
        monkeypatch.setenv(parallel.THREADS_ENV, str(threads))
        row_functions.clear()
        results[threads] = steps()
        assert "_adamw_update" in row_functions
    assert results[2] == results[1] and results[3] == results[1]


def training_steps(config, steps=2, batch=6):
    """Every parameter's bytes after ``steps`` SigLIP + AdamW steps of a freshly made model."""
    model = tc.models.CLIP(config, seed=0)
    rng = numpy.random.default_rng(0)
    images = rng.standard_normal((batch, config.image_size, config.image_size, 3)).astype(numpy.float32)
    tokens = rng.integers(1, config.eos_id, (batch, config.context_length))
    tokens[:, -1] = config.eos_id
    optimizer = tc.optim.AdamW(list(model.parameters()), lr=1e-3, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        image_emb, text_emb, log_scale, bias = model(images, tokens)
        tc.losses.siglip_loss(image_emb, text_emb, log_scale, bias).backward()
        optimizer.step()
    return [p.data.tobytes() for _, p in model.named_parameters()]


MODELS = {       # with SigLIP's learned bias, as the default run
    "vit, gelu tanh": tc.models.preset("tiny", activation="gelu_tanh", init_bias=-10.0),
    "vit, quick gelu": tc.models.preset("tiny", activation="quick_gelu", init_bias=-10.0),
    "vit, exact gelu": tc.models.preset("tiny", activation="gelu", init_bias=-10.0),
    "cnn": tc.models.preset("shapes", conv_channels=(4, 8), text_width=16, text_layers=1, text_heads=2,
                            context_length=8, vocab_size=64, eos_id=63, embed_dim=8),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_steps_are_bit_identical_at_every_thread_count(name, row_functions, monkeypatch):
    results = {}
    for threads in THREADS:
        monkeypatch.setenv(parallel.THREADS_ENV, str(threads))
        results[threads] = training_steps(MODELS[name])
    assert "_adamw_update" in row_functions and "_layer_norm_rows" in row_functions
    for threads in THREADS[1:]:
        assert results[threads] == results[1], f"{name}: {threads} threads differ from 1"


def test_pixel_normalisation_is_the_serial_formula_bit_for_bit_at_every_thread_count(row_functions, monkeypatch):
    pixels = numpy.random.default_rng(3).integers(0, 256, (5, 7, 6, 3), dtype=numpy.uint8)
    for family in ("clip", "siglip"):
        mean, std = ((tc.data.transforms.CLIP_MEAN, tc.data.transforms.CLIP_STD) if family == "clip" else
                     (tc.data.transforms.SIGLIP_MEAN, tc.data.transforms.SIGLIP_STD))
        # the formula as it was written before it went to the pool
        serial = ((pixels.astype(numpy.float32) / numpy.float32(255.0) - numpy.asarray(mean, numpy.float32))
                  / numpy.asarray(std, numpy.float32))
        for threads in THREADS:
            monkeypatch.setenv(parallel.THREADS_ENV, str(threads))
            row_functions.clear()
            # a batch is cut into images, one image into rows of pixels
            for batch, expected in ((pixels, serial), (pixels[0], serial[0])):
                out = tc.data.transforms.normalize(batch, family)
                assert out.dtype == numpy.float32 and out.tobytes() == expected.tobytes(), (family, threads)
            assert "_normalize_rows" in row_functions
