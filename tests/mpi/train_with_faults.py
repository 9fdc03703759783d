"""``tinyclip`` on the command line with a fault where the environment asks for one (tests/test_faults.py).

Run as ``python -m tests.mpi.train_with_faults train ...``, under ``mpiexec`` or alone:

TINYCLIP_TEST_FAIL_RANK=R:K   rank R raises OSError at its K-th training batch, as a disk or a file that fails
TINYCLIP_TEST_READY=FILE      rank 0 writes FILE once the first step is done (the test then sends its signals)
"""

import os
import sys

from tinyclip import cli, train

fail_rank, _, fail_batch = os.environ.get("TINYCLIP_TEST_FAIL_RANK", "").partition(":")
ready = os.environ.get("TINYCLIP_TEST_READY")
original_next_batch = train.Run.next_batch


def next_batch(run):
    run.batches_taken = getattr(run, "batches_taken", 0) + 1
    if fail_rank and run.comm.rank == int(fail_rank) and run.batches_taken == int(fail_batch):
        raise OSError(28, f"no space left on device (injected on rank {run.comm.rank})")
    if ready and run.comm.rank == 0 and run.batches_taken == 2:      # the first step is done
        with open(ready, "w", encoding="utf-8") as file:
            file.write(f"{os.getpid()}\n")
    return original_next_batch(run)


train.Run.next_batch = next_batch

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
