"""Run under ``mpiexec -n K``: rank 1 raises while the others wait in a collective.

The whole job must end with a non-zero status within seconds (tinyclip's
abort-on-error hook, installed as the trainer does), not hang. tests/test_distributed.py
times it.
"""

import numpy

from tinyclip import distributed

comm = distributed.world()
distributed.install_abort_on_error(comm)
if comm.rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
comm.all_reduce(numpy.ones(4))     # never completes: rank 1 is gone
print("unreachable: the collective finished without rank 1", flush=True)
