"""Run under ``mpiexec -n K``: the distributed losses against tinyclip.losses on the whole batch.

For every global batch in BATCHES (some that K does not divide) and every
method, rank 0 prints one JSON line per case with the largest errors of the
loss (the shares summed), the gathered per-rank gradients of the embeddings,
and the scale and bias gradients summed over ranks, all float64, plus the
error of each rank's scale gradient against a central difference of its own
share. tests/test_distributed.py launches it and checks the numbers.
"""

import json
import sys

import numpy

import tinyclip as tc
from tinyclip import distributed, losses

BATCHES = (5, 8, 11)
DIM = 6
LOG_SCALE, BIAS = numpy.log(8.0), -3.0

CASES = {
    "siglip": (lambda *a, **k: distributed.siglip_loss(*a, **k), losses.siglip_loss, True),
    "siglip-bidirectional": (lambda *a, **k: distributed.siglip_loss(*a, bidirectional=True, **k),
                             losses.siglip_loss, True),
    "clip-ring": (lambda *a, **k: distributed.clip_loss(*a, method="ring", **k), losses.clip_loss, False),
    "clip-gather": (lambda *a, **k: distributed.clip_loss(*a, method="gather", **k), losses.clip_loss, False),
}


def unit_rows(rng, shape):
    rows = rng.normal(size=shape)
    return rows / numpy.linalg.norm(rows, axis=1, keepdims=True)


def local_rows(batch, comm):
    """This rank's slice of the global batch: the first batch % size ranks get one more."""
    sizes = [batch // comm.size + (rank < batch % comm.size) for rank in range(comm.size)]
    start = sum(sizes[:comm.rank])
    return slice(start, start + sizes[comm.rank])


def run(loss, images, texts, has_bias, **options):
    inputs = [tc.tensor(images.copy(), requires_grad=True), tc.tensor(texts.copy(), requires_grad=True),
              tc.tensor(numpy.array(LOG_SCALE), requires_grad=True)]
    if has_bias:
        inputs.append(tc.tensor(numpy.array(BIAS), requires_grad=True))
    value = loss(*inputs, **options)
    value.backward()
    return float(value.data), [tensor.grad for tensor in inputs]


def main():
    comm = distributed.world()
    rng = numpy.random.default_rng(1234)
    for batch in BATCHES:
        images, texts = unit_rows(rng, (batch, DIM)), unit_rows(rng, (batch, DIM))
        mine = local_rows(batch, comm)
        for name, (distributed_loss, single_loss, has_bias) in CASES.items():
            for tile in (1, 3, None):
                share, grads = run(distributed_loss, images[mine], texts[mine], has_bias, comm=comm, tile=tile)
                total = comm.all_reduce(numpy.array([share]))[0]
                grad_images, grad_texts = comm.all_gather(grads[0]), comm.all_gather(grads[1])
                scalar_grads = comm.all_reduce(numpy.array([float(g) for g in grads[2:]]))
                expected, expected_grads = run(single_loss, images, texts, has_bias)

                # this rank's scale gradient is the derivative of its own share
                step = 1e-5
                shifted = []
                for sign in (1, -1):
                    inputs = [images[mine], texts[mine], LOG_SCALE + sign * step] + ([BIAS] if has_bias else [])
                    with tc.no_grad():
                        shifted.append(float(distributed_loss(*inputs, comm=comm, tile=tile).data))
                share_slope = (shifted[0] - shifted[1]) / (2 * step)
                slope_error = comm.all_gather(numpy.array([abs(share_slope - float(grads[2]))]))

                if comm.rank == 0:
                    scale = max(1.0, abs(expected))
                    print(json.dumps({
                        "size": comm.size, "batch": batch, "case": name, "tile": tile,
                        "loss": abs(total - expected) / scale,
                        "image_emb": float(numpy.abs(grad_images - expected_grads[0]).max()),
                        "text_emb": float(numpy.abs(grad_texts - expected_grads[1]).max()),
                        "scalars": float(numpy.abs(scalar_grads - numpy.array(
                            [float(g) for g in expected_grads[2:]])).max()),
                        "share_slope": float(slope_error.max()),
                    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
