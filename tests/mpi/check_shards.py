"""Run under ``mpiexec -n K`` with TINYCLIP_TEST_SHARDS set to a shard pattern: each rank streams its shards.

Every rank loads two epochs with two worker processes and prints one JSON
line: its rank and, per epoch, the captions of its batches in order.
tests/test_loader_workers.py checks that no example is on two ranks, that
together they read every example the step count allows, and that each
rank's batches are what a single process computing that rank gives.
"""

import json
import os

from tinyclip import distributed
from tinyclip.data.loader import Loader
from tinyclip.data.shards import ShardCaptions

BATCH = 4

comm = distributed.world()
pairs = ShardCaptions(os.environ["TINYCLIP_TEST_SHARDS"])
loader = Loader(pairs, BATCH, seed=5, rank=comm.rank, world_size=comm.size,
                transform=lambda image, rng: image.size, workers=2)
with loader:
    epochs = [[next(loader)[1] for _ in range(loader.steps_per_epoch)] for _ in range(2)]
print(json.dumps({"rank": comm.rank, "steps": loader.steps_per_epoch, "epochs": epochs}), flush=True)
