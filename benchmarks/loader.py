"""How many 224 px training crops per second the loader makes from ~500×375 JPEGs, by number of workers.

A seeded set of photo-like JPEGs (smooth colour fields with noise, 500×375
and 375×500, quality 90, about the size of a COCO or CC3M image) is written
once to a temporary folder as files with a CSV and as webdataset tar shards.
For 1, 2, ... up to the usable cores of workers, and for both layouts, a
``Loader`` with open_clip's training transform (``random_resized_crop`` to
224 px, bicubic, normalised float32) takes ``--batches`` batches of
``--batch-size`` after one warm-up batch (which starts the worker processes),
``--repeat`` times; the table gives the best and the median rate and the
ratio to N × the one-worker rate (target, issue 17: at least 0.8 up to the
cores). The rows take turns within each round, so a busy moment hits all
alike. The machine and its load average are printed beside it: on a shared
machine other processes take cores, and the ratio says so. The last column,
CPU time per image over the same timed batches (this process and its live
workers, from /proc on Linux), hardly depends on how busy the machine is:
equal values for 1 and N workers mean the work splits without overhead, and
the rate then scales with the free cores.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/loader.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/loader.py --images 1024 --batch-size 64
"""

import argparse
import csv
import functools
import io
import multiprocessing
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time

import numpy
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout, uninstalled
from benchmarks.common import machine_description  # noqa: E402
from tinyclip.data.captions import CSVCaptions  # noqa: E402
from tinyclip.data.loader import Loader  # noqa: E402
from tinyclip.data.shards import ShardCaptions  # noqa: E402
from tinyclip.data.transforms import random_resized_crop  # noqa: E402

IMAGE_SIZE = 224
TARGET_RATIO = 0.8


def photo_like_jpeg(rng):
    """JPEG bytes of a 500×375 (or 375×500) smooth colour field with noise: decodes like a photograph."""
    width, height = (500, 375) if rng.random() < 0.7 else (375, 500)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=numpy.uint8)
    field = numpy.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=numpy.int16)
    pixels = numpy.clip(field + rng.integers(-20, 21, field.shape), 0, 255).astype(numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_data(folder, images, per_shard):
    """``images`` JPEGs as files with pairs.csv, and the same as shards of ``per_shard``; returns both paths."""
    rng = numpy.random.default_rng(0)
    rows, shard = [], None
    for index in range(images):
        data = photo_like_jpeg(rng)
        name = f"{index:06d}.jpg"
        with open(os.path.join(folder, name), "wb") as file:
            file.write(data)
        rows.append((name, f"photo number {index}"))
        if index % per_shard == 0:
            if shard is not None:
                shard.close()
            shard = tarfile.open(os.path.join(folder, f"train-{index // per_shard:06d}.tar"), "w")
        for member, payload in ((name, data), (f"{index:06d}.txt", rows[-1][1].encode())):
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            shard.addfile(info, io.BytesIO(payload))
    shard.close()
    with open(os.path.join(folder, "pairs.csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    shards = (images + per_shard - 1) // per_shard
    return os.path.join(folder, "pairs.csv"), os.path.join(folder, f"train-{{000000..{shards - 1:06d}}}.tar")


def cpu_seconds():
    """CPU time so far of this process (all its threads) and of its live child processes (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()      # after the command name, which may hold spaces
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")      # utime, stime
    return total


def rate(dataset, workers, batch_size, batches):
    """(images per second over ``batches`` batches after one warm-up batch, CPU seconds per image loaded)."""
    transform = functools.partial(random_resized_crop, image_size=IMAGE_SIZE, family=None)   # uint8, as training
    with Loader(dataset, batch_size, seed=0, transform=transform, workers=workers, prefetch=2) as loader:
        next(loader)
        # the pipeline is full now (the loader loads ahead) and stays full to the end, so the CPU time between
        # here and the last batch is that of the timed batches
        started, cpu_before = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            next(loader)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    return batches * batch_size / seconds, cpu / (batches * batch_size)


def main():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512, help="JPEGs written (the loader cycles over them)")
    parser.add_argument("--per-shard", type=int, default=64, help="examples per tar shard")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per row (best and median shown)")
    parser.add_argument("--max-workers", type=int, default=usable, help="most workers tried (default: usable cores)")
    args = parser.parse_args()
    print(machine_description(numpy, "numpy"))
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())} "
          f"(1, 5, 15 min; other processes share these {usable} cores)")
    with tempfile.TemporaryDirectory() as folder:
        csv_path, pattern = write_data(folder, args.images, args.per_shard)
        layouts = {"folder": CSVCaptions(csv_path), "shards": ShardCaptions(pattern)}
        jpeg_bytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".jpg"))
        print(f"{args.images} JPEGs of ~500x375 ({jpeg_bytes / args.images / 1024:.0f} KiB each), crops of "
              f"{IMAGE_SIZE} px, batch {args.batch_size}, {args.batches} batches x {args.repeat} rounds")
        rows = [(name, workers) for name in layouts for workers in range(1, args.max_workers + 1)]
        results = {row: [] for row in rows}
        for _ in range(args.repeat):
            for name, workers in rows:
                results[name, workers].append(rate(layouts[name], workers, args.batch_size, args.batches))
        print(f"{'layout':<8} {'workers':>7} {'best img/s':>11} {'median':>8} {'best / (N x one)':>17} "
              f"{'CPU ms/image':>13}")
        for name, workers in rows:
            rates = [images_per_second for images_per_second, _ in results[name, workers]]
            one = max(images_per_second for images_per_second, _ in results[name, 1])
            ratio = max(rates) / (workers * one)
            cpu = statistics.median(cpu for _, cpu in results[name, workers]) * 1000
            print(f"{name:<8} {workers:>7} {max(rates):>11.1f} {statistics.median(rates):>8.1f} {ratio:>8.2f} "
                  f"{'ok' if ratio >= TARGET_RATIO else 'below 0.8':>8} {cpu:>13.2f}")
    print(f"load average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
