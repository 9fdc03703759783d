"""How long loading a ViT-B/16-sized model folder takes, and how much memory it needs at its peak.

A ``ViT-B-16`` CLIP (about 150 million float32 parameters, a 600 MB
``model.safetensors``) is saved once into a folder; then each round loads it
with ``tinyclip.checkpoint.load`` in a fresh Python process (so that nothing
is cached in the interpreter), after the file has been read once so that it
sits in the page cache for every round alike. Each round reports:

- the wall time of ``checkpoint.load`` alone (imports excluded);
- the peak of memory allocated through Python and NumPy during the load
  (``tracemalloc``; NumPy reports its array buffers to it), beyond what was
  allocated before;
- the growth of the process's peak resident set (``ru_maxrss``) over the load,
  which also counts the pages of a memory-mapped file while they are touched
  (page cache shared with the system, not memory the process allocated).

The weights themselves are the floor for all three: 600 MB must be read and
kept. ``--source`` points the child processes at another checkout of tinyclip
(for example an export of an older commit), so that two versions are measured
on one machine, one after the other:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/load.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/load.py --source /tmp/tinyclip-before

Run it with those two variables unset (as above): they tune OpenBLAS for the
tests' machine and have no place in a measurement. Medians and minima over
``--repeat`` rounds are printed with the machine they ran on.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # run from a checkout, uninstalled
from benchmarks.common import machine_description  # noqa: E402
from tinyclip.backend import backend_module  # noqa: E402

CHILD = r"""
import json, resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from tinyclip import checkpoint
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
start = time.perf_counter()
model = checkpoint.load(sys.argv[2])
seconds = time.perf_counter() - start
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(parameter.data.nbytes for parameter in model.parameters())
print(json.dumps({"seconds": seconds, "traced_peak": peak, "rss_growth": (rss_after - rss_before) * 1024,
                  "weights": weights}))
"""


def make_folder(folder, preset_name):
    """Save a model of the preset's shape into ``folder`` (its weights' values do not matter here).

    In a child process: on Linux a child's peak resident set starts from its parent's at the fork, so the
    parent must stay small for the children's ``ru_maxrss`` to mean anything.
    """
    code = ("import sys; from tinyclip import checkpoint; from tinyclip.models import CLIP, preset; "
            "checkpoint.save(CLIP(preset(sys.argv[1]), dtype='float32'), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, preset_name, folder], check=True,
                   env={**os.environ, "PYTHONPATH": ROOT})


def load_once(source, folder):
    result = subprocess.run([sys.executable, "-c", CHILD, source, folder], check=True, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": source})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=ROOT, help="the tinyclip checkout whose checkpoint.load is measured")
    parser.add_argument("--folder", help="a saved model folder to load (default: a ViT-B-16 saved into a "
                                         "temporary folder)")
    parser.add_argument("--preset", default="ViT-B-16")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or os.path.join(scratch, "model")
        if not args.folder:
            make_folder(folder, args.preset)
        with open(os.path.join(folder, "model.safetensors"), "rb") as file:   # into the page cache for all rounds
            while file.read(1 << 24):
                pass
        rounds = [load_once(os.path.abspath(args.source), folder) for _ in range(args.repeat)]
    print(machine_description(backend_module("numpy"), "numpy"))
    print(f"source: {os.path.abspath(args.source)}")
    weights = rounds[0]["weights"]
    print(f"model: {args.preset if not args.folder else args.folder}, weights {weights / 2**20:.0f} MiB; "
          f"{args.repeat} rounds, each in a fresh process")
    for key, label, scale, unit in (("seconds", "load time", 1, "s"),
                                    ("traced_peak", "traced peak (tracemalloc)", 2**20, "MiB"),
                                    ("rss_growth", "resident set growth (ru_maxrss)", 2**20, "MiB")):
        values = [round_[key] / scale for round_ in rounds]
        print(f"{label:34s} min {min(values):9.2f} {unit}   median {statistics.median(values):9.2f} {unit}")


if __name__ == "__main__":
    main()
