"""Run under ``mpiexec -n K``: the ring sends exactly what the theory says, and bad input fails everywhere.

Prints JSON lines from rank 0: the bytes each rank handed to MPI for one
SigLIP ring step with gradients (theory: (D−1)·b·d values out with the text
chunks and (D−1)·b·d back as their gradients), and whether a log_scale that
differs between ranks raised a ValueError on every rank.
"""

import json

import numpy

import tinyclip as tc
from tinyclip import distributed

comm = distributed.world()
rows, dim = 3, 4
rng = numpy.random.default_rng(comm.rank)
images, texts = rng.normal(size=(rows, dim)), rng.normal(size=(rows, dim))

before = comm.bytes_sent
loss = distributed.siglip_loss(tc.tensor(images, requires_grad=True), tc.tensor(texts, requires_grad=True),
                               0.0, -1.0, comm=comm)
loss.backward()
sent = comm.all_gather_values([comm.bytes_sent - before], numpy.int64)[:, 0]
if comm.rank == 0:
    print(json.dumps({"sent": sent.tolist(), "theory": 2 * (comm.size - 1) * rows * dim * 8}), flush=True)

try:
    distributed.clip_loss(images, texts, float(comm.rank == 1), comm=comm)
    raised = 0
except ValueError as error:
    raised = int("log_scale" in str(error))
everyone = comm.all_gather_values([raised], numpy.int64)[:, 0]
if comm.rank == 0:
    print(json.dumps({"raised_everywhere": bool(everyone.all()) if comm.size > 1 else None}), flush=True)
