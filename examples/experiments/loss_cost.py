"""Cost of the losses against the batch: time and memory, tiled vs untiled, ring vs gather across ranks.

Two measurements, both from the benchmarks in ``benchmarks/``:

* one process (``benchmarks/losses.py``'s inputs and timing): forward +
  backward of the fused, tiled ``tinyclip.losses.clip_loss`` / ``siglip_loss``
  against the from-primitives references that hold several B×B matrices;
  the median time and the peak extra memory, for B from 256 to 4096;
* across ranks (``benchmarks/distributed.py`` under ``mpiexec -n 2``):
  CLIP by the ring and by all-gather, and SigLIP's chunked ring — time,
  per-rank peak memory and bytes sent.

The claim to check (SigLIP, Zhai et al. 2023, its efficient "chunked" implementation; DESIGN.md): the tiled
losses need O(tile·B) memory, never B², so their memory grows linearly
where the reference's grows quadratically, at a small cost in time; the
ring never holds the global batch's embeddings, the gather does.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/experiments/loss_cost.py   # ~6 min, loaded 2 cores
    python examples/experiments/loss_cost.py --quick    # seconds: checks that it runs
"""

import json
import os
import shutil
import subprocess
import sys
import time

import common                  # first: it sets the BLAS threads before NumPy loads
import numpy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)                                 # benchmarks/ is a folder of the checkout
from benchmarks.common import peak_extra_bytes, timed    # noqa: E402
from benchmarks.losses import clearing_gradients, loss_steps, make_inputs  # noqa: E402

BATCHES = (256, 512, 1024, 2048, 4096)
RANK_BATCHES = (1024, 4096, 16384)
DIM = 256
REPEAT = 3
MB = 2 ** 20


def single_process(batches, repeat):
    """[{batch, loss, ms, peak_mb}] for the fused losses and the references on this process."""
    rows = []
    rng = numpy.random.default_rng(0)
    for batch in batches:
        inputs = make_inputs(numpy, rng, batch, DIM, numpy.float32)
        leaves = list(inputs.values())
        steps = loss_steps(inputs, tile=None)
        runs = [clearing_gradients(step, leaves) for step in steps.values()]
        for name, run, seconds in zip(steps, runs, timed(runs, numpy, repeat, warmup=1)):
            rows.append({"batch": batch, "loss": name, "ms": round(seconds * 1e3, 2),
                         "peak_mb": round(peak_extra_bytes(run, numpy, "numpy") / MB, 2)})
            print(rows[-1], flush=True)
    return rows


def across_ranks(batches, repeat, ranks=2):
    """The JSON rows of benchmarks/distributed.py under mpiexec -n ``ranks``, or a reason there are none."""
    mpiexec = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if mpiexec is None:
        return [], "no mpiexec on PATH"
    command = [mpiexec, "-n", str(ranks), sys.executable, os.path.join(ROOT, "benchmarks", "distributed.py"),
               "--json", "--dim", str(DIM), "--repeat", str(repeat), "--backend", "numpy", "--batch",
               *map(str, batches), "--methods", "clip ring", "clip gather", "siglip ring"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    if done.returncode:
        return [], f"mpiexec failed: {done.stderr[-500:]}"
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [{key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}
            for row in rows], None


def main(argv=None):
    args = common.arguments(__doc__).parse_args(argv)
    started = time.perf_counter()
    batches, rank_batches, repeat = ((64, 128), (64, 128), 1) if args.quick else (BATCHES, RANK_BATCHES, REPEAT)
    single = single_process(batches, repeat)
    ranks, missing = across_ranks(rank_batches, repeat)
    print(ranks or missing, flush=True)

    plt = common.pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in dict.fromkeys(row["loss"] for row in single):
        points = [row for row in single if row["loss"] == name]
        style = "o-" if "fused" in name else "s--"
        axes[0].plot([p["batch"] for p in points], [p["ms"] for p in points], style, label=name)
        axes[1].plot([p["batch"] for p in points], [p["peak_mb"] for p in points], style, label=name)
    for method in dict.fromkeys(row["method"] for row in ranks):
        points = [row for row in ranks if row["method"] == method]
        axes[2].plot([p["batch"] for p in points], [p["peak_mb"] for p in points], "o-", label=f"{method}: MB")
    axes[0].set(xscale="log", yscale="log", xlabel="batch B", ylabel="forward + backward, ms",
                title=f"one process (D = {DIM})")
    axes[1].set(xscale="log", yscale="log", xlabel="batch B", ylabel="peak extra memory, MB", title="one process")
    axes[2].set(xscale="log", yscale="log", xlabel="global batch B", ylabel="per-rank peak extra memory, MB",
                title="2 ranks" if ranks else f"2 ranks: {missing}")
    for axis in axes:
        axis.legend(fontsize=7)
    common.write(args.out, "loss_cost", {"settings": {"dim": DIM, "repeat": REPEAT, "ranks": 2},
                                         "single_process": single, "across_ranks": ranks,
                                         "across_ranks_missing": missing}, started, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
