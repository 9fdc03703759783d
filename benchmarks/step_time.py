"""The default run's step time: one process with one and with every thread, against ``mpiexec -n <cores>``.

Issue 18 asks that one process use every core: its element-wise work runs
on ``tinyclip.parallel``'s row blocks (``TINYCLIP_THREADS``, default the
usable cores), its matrix products on OpenBLAS's threads. This runs the real
command, ``tinyclip train`` (built-in shapes, SigLIP loss, the loader, the
optimiser: everything but the evaluation), for ``--steps`` steps with a
preset, in turn as

  1 process, TINYCLIP_THREADS=1          the element-wise work on one core
  1 process, TINYCLIP_THREADS=<cores>    the default
  both again with OPENBLAS_NUM_THREADS=1 the matrix products on one core: what the pool alone gives
  mpiexec -n <cores>                     OPENBLAS_NUM_THREADS=1 and TINYCLIP_THREADS=1 in each rank

(``tinyclip train`` started in one process without ``OPENBLAS_THREAD_TIMEOUT`` runs itself
again with it set to 4, so that OpenBLAS's idle threads sleep instead of spinning on the cores
the row blocks need; the header says whether the variable was set) and reads each run's ``metrics.jsonl``: the step time is the training time
between the first logged step after ``--skip`` steps and the last step,
divided by the steps between them (start-up, the tokenizer, the first steps'
allocations, the closing evaluation and checkpoint are left out). With
``--rounds`` R the three take turns R times and the median and the best are
printed, so that a busy neighbour slows them alike, and the ratio of each to
the mpiexec run. The issue's target: one process within 1.1× of mpiexec.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/step_time.py --preset shapes-vit --rounds 3

Some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, which force an
older BLAS kernel; the command above unsets them, and the header says
whether they were set, with the load average before and after.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                              # run from a checkout, uninstalled
from benchmarks.common import machine_description  # noqa: E402
from tinyclip import parallel  # noqa: E402
from tinyclip.train import TrainConfig  # noqa: E402


def train_command(args, out):
    return [sys.executable, "-m", "tinyclip", "train", "--preset", args.preset, "--batch-size", str(args.batch),
            "--steps", str(args.steps), "--log-every", str(args.log_every), "--eval-every", "0",
            "--checkpoint-every", "0", "--no-plots", "--out", out]


def configurations(cores):
    """[(name, command prefix, environment changes)]."""
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    one_blas_thread = {"OPENBLAS_NUM_THREADS": "1"}
    return [("1 process, TINYCLIP_THREADS=1", [], {parallel.THREADS_ENV: "1"}),
            (f"1 process, TINYCLIP_THREADS={cores}", [], {parallel.THREADS_ENV: str(cores)}),
            ("1 process, 1 thread, 1 BLAS thread", [], {parallel.THREADS_ENV: "1", **one_blas_thread}),
            (f"1 process, {cores} threads, 1 BLAS thread", [], {parallel.THREADS_ENV: str(cores), **one_blas_thread}),
            (f"mpiexec -n {cores}", [mpiexec, "-n", str(cores)], {parallel.THREADS_ENV: "1", **one_blas_thread})]


def seconds_per_step(metrics_path, skip):
    """(last - first) training seconds / steps between them, over the logged steps after ``skip``."""
    with open(metrics_path) as metrics:
        records = [json.loads(line) for line in metrics if line.strip()]
    timed = [(r["step"], r["seconds"]) for r in records if "seconds" in r and r["step"] > skip]
    if len(timed) < 2:
        raise SystemExit(f"{metrics_path}: fewer than two logged steps after step {skip}; "
                         "raise --steps or lower --log-every / --skip")
    (first_step, first_seconds), (last_step, last_seconds) = timed[0], timed[-1]
    return (last_seconds - first_seconds) / (last_step - first_step)


def run_once(args, prefix, changes, folder):
    out = os.path.join(folder, "run")
    environment = {**os.environ, **changes, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(prefix + train_command(args, out), env=environment, cwd=folder,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(prefix + train_command(args, out))} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}")
    return seconds_per_step(os.path.join(out, "metrics.jsonl"), args.skip)


def load():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=TrainConfig.preset, help="model preset (default: the default run's)")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="steps left out at the start")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cores", type=int, default=None, help="threads and ranks (default: the usable cores)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    args = parser.parse_args()
    cores = args.cores or parallel.thread_count()
    print(machine_description(numpy, "numpy"))
    print("OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE set: "
          f"{[name for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE') if name in os.environ] or 'neither'}")
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    print("OPENBLAS_THREAD_TIMEOUT: " + (f"{timeout} (set here, kept by every run)" if timeout is not None else
          "unset here; tinyclip train restarts one process with 4 (tinyclip.cli), mpiexec ranks keep OpenBLAS's own"))
    print(f"tinyclip train --preset {args.preset} --batch-size {args.batch} --steps {args.steps}: s/step over steps "
          f"{args.skip + args.log_every - args.skip % args.log_every}..{args.steps}, {args.rounds} round(s)")
    print(f"load average before: {load()}\n", flush=True)
    runs = configurations(cores)
    times = {name: [] for name, _, _ in runs}
    with tempfile.TemporaryDirectory(prefix="tinyclip-step-time-") as folder:
        for round_index in range(args.rounds):
            for name, prefix, changes in runs:
                times[name].append(run_once(args, prefix, changes, folder))
                shutil.rmtree(os.path.join(folder, "run"))
                print(f"round {round_index + 1}: {name:34s} {times[name][-1]:.3f} s/step  (load {load()})", flush=True)
    reference = statistics.median(times[runs[-1][0]])
    print(f"\n{'run':34s} {'median s/step':>14s} {'best s/step':>12s} {'÷ mpiexec':>10s}")
    for name, _, _ in runs:
        median = statistics.median(times[name])
        print(f"{name:34s} {median:14.3f} {min(times[name]):12.3f} {median / reference:10.2f}")
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
