"""``tinyclip`` on the command line, with faults injected where the environment says (tests/test_faults.py).

Run as ``python -m tests.mpi.train_with_faults train ...`` (under ``mpiexec`` or alone). The variables:

TINYCLIP_TEST_RECORD=FILE     append "index point path" for every step of every atomic write reached
                              (tinyclip.checkpoint's fault points), to learn the sequence
TINYCLIP_TEST_KILL_AT=N       SIGKILL this process at the N-th step (1-based), as a crash or the OOM killer
TINYCLIP_TEST_TERM_AT=N       send this process SIGTERM twice at the N-th step: the second signal stops at once
TINYCLIP_TEST_FAIL_RANK=R:K   rank R raises OSError at its K-th training batch, as a disk or a file that fails
TINYCLIP_TEST_READY=FILE      rank 0 writes FILE once the first step is done (the test then sends signals)

Only rank 0 writes files, so the fault points are rank 0's.
"""

import itertools
import os
import signal
import sys

from tinyclip import checkpoint, cli, train

counter = itertools.count(1)
record = os.environ.get("TINYCLIP_TEST_RECORD")
kill_at = int(os.environ.get("TINYCLIP_TEST_KILL_AT", "0"))
term_at = int(os.environ.get("TINYCLIP_TEST_TERM_AT", "0"))


def at_fault_point(point, path):
    index = next(counter)
    if record:
        with open(record, "a", encoding="utf-8") as file:
            file.write(f"{index} {point} {path}\n")
    if index == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if index == term_at:
        os.kill(os.getpid(), signal.SIGTERM)          # the first: finish the step and save (already saving)
        os.kill(os.getpid(), signal.SIGTERM)          # the second: stop now


checkpoint.fault_hook = at_fault_point

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
