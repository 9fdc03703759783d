"""Tests for the loader's worker processes, and for streamed shards split over real MPI ranks.

Workers: the batches of 2 and 3 worker processes are those of one worker,
bit for bit, for a caption set with random crops and for a data set with
``batch``; resuming keeps that. An exception raised in a worker reaches the
training loop as itself; a worker killed by a real SIGKILL ends the wait
with ``WorkerDied`` (checked with a deadline, never a sleep); close() ends
the processes. Under ``mpiexec -n 2`` the ranks read disjoint shards whose
union is every example their steps take.
"""

import functools
import json
import multiprocessing
import os
import signal
import threading

import numpy
import pytest
from PIL import Image

from tests.shard_data import example_number, write_shards
from tests.test_distributed import launch, needs_mpi, records
from tinyclip.data.captions import CSVCaptions
from tinyclip.data.loader import Loader, WorkerDied
from tinyclip.data.shards import ShardCaptions
from tinyclip.data.transforms import random_resized_crop


class Numbered:
    """Example i: a 2×2 image filled with i % 256, caption str(i); 30 of them."""

    def __len__(self):
        return 30

    def batch(self, indices):
        values = (numpy.asarray(indices) % 256).astype(numpy.uint8)
        return numpy.broadcast_to(values[:, None, None, None], (len(indices), 2, 2, 3)).copy(), list(map(str, indices))


@pytest.fixture
def caption_csv(tmp_path):
    rng = numpy.random.default_rng(0)
    rows = ["filepath,title"]
    for i in range(13):
        Image.fromarray(rng.integers(0, 256, (18 + i, 25, 3), dtype=numpy.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,picture {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def batches(dataset, workers, count, **options):
    with Loader(dataset, 5, seed=4, workers=workers, **options) as loader:
        return [next(loader) for _ in range(count)]


def assert_same(expected, got):
    assert len(expected) == len(got)
    for (images, captions), (got_images, got_captions) in zip(expected, got):
        assert got_captions == captions
        numpy.testing.assert_array_equal(got_images, images)


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_give_the_batches_of_one_worker(caption_csv, workers):
    pairs = CSVCaptions(caption_csv)
    transform = functools.partial(random_resized_crop, image_size=8, family="siglip")
    assert_same(batches(pairs, 1, 7, transform=transform), batches(pairs, workers, 7, transform=transform))
    assert_same(batches(Numbered(), 1, 9), batches(Numbered(), workers, 9))


def test_workers_resume_where_one_worker_stopped(caption_csv):
    pairs = CSVCaptions(caption_csv)
    transform = functools.partial(random_resized_crop, image_size=8, family="clip")
    expected = batches(pairs, 1, 8, transform=transform)
    with Loader(pairs, 5, seed=4, workers=1, transform=transform) as first:
        for _ in range(3):
            next(first)
        state = json.loads(json.dumps(first.state()))
    with Loader(pairs, 5, seed=4, workers=3, transform=transform, start=state) as resumed:
        assert_same(expected[3:], [next(resumed) for _ in range(5)])


def next_with_deadline(loader, seconds=60):
    """next(loader) on a helper thread: (batch or None, exception or None); fails the test if it takes too long."""
    outcome = {}

    def take():
        try:
            outcome["batch"] = next(loader)
        except BaseException as error:          # noqa: B902 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"next(loader) still waiting after {seconds} s"
    return outcome.get("batch"), outcome.get("error")


def test_an_error_in_a_worker_reaches_the_loop_as_itself(caption_csv):
    os.remove(caption_csv.parent / "7.png")
    pairs = CSVCaptions(caption_csv, strict=True)
    transform = functools.partial(random_resized_crop, image_size=8, family="clip")
    with Loader(pairs, 13, seed=0, workers=2, transform=transform) as loader:
        _, error = next_with_deadline(loader)
    assert isinstance(error, FileNotFoundError) and "7.png" in str(error)


def kill_own_process_at_index_3(image, rng, index_of):
    if index_of(image) == 3:
        os.kill(os.getpid(), signal.SIGKILL)                 # a real signal, as the OOM killer sends
    return numpy.zeros((2, 2, 3), numpy.uint8)


class Indexed:
    """30 pairs whose "image" is the index, so that a transform can tell which example it has."""

    def __len__(self):
        return 30

    def load(self, index):
        return index

    def caption(self, index):
        return str(index)


def test_a_killed_worker_ends_the_wait_with_an_error_and_close_ends_the_workers():
    dataset = Indexed()
    transform = functools.partial(kill_own_process_at_index_3, index_of=int)
    loader = Loader(dataset, 30, seed=0, workers=2, transform=transform)
    _, error = next_with_deadline(loader)
    assert isinstance(error, WorkerDied) and "ended without finishing" in str(error)
    loader.close()
    assert multiprocessing.active_children() == []


def test_workers_argument_is_checked():
    with pytest.raises(ValueError, match="workers must be a positive int"):
        Loader(Numbered(), 5, workers=0)
    with pytest.raises(ValueError, match="need prefetch >= 1"):
        Loader(Numbered(), 5, workers=2, prefetch=0)


@needs_mpi
def test_two_mpi_ranks_read_disjoint_shards_and_every_example_their_steps_take(tmp_path, monkeypatch):
    sizes = [5, 4, 6, 3, 5]
    pattern = write_shards(tmp_path, sizes)
    monkeypatch.setenv("TINYCLIP_TEST_SHARDS", pattern)
    lines = sorted(records(launch(2, "check_shards", timeout=120)), key=lambda line: line["rank"])
    assert [line["rank"] for line in lines] == [0, 1]
    steps = lines[0]["steps"]
    assert steps == min((5 + 6 + 5) // 2, (4 + 3) // 2) == 3
    pairs = ShardCaptions(pattern)
    for epoch in range(2):
        per_rank = [[caption for batch in line["epochs"][epoch] for caption in batch] for line in lines]
        shards = [{example_number(caption)[0] for caption in captions} for captions in per_rank]
        assert shards[0] <= {0, 2, 4} and shards[1] <= {1, 3}                # each rank its own shards
        assert not set(per_rank[0]) & set(per_rank[1])                          # no overlap
        assert len(per_rank[0]) == len(per_rank[1]) == steps * 2                 # no loss within the steps
        assert len(set(per_rank[1])) == 6
        # each rank's batches are what one process computing that rank gives
        with Loader(pairs, 4, seed=5, rank=1, world_size=2, transform=lambda image, rng: image.size) as alone:
            for _ in range(epoch * steps):
                next(alone)
            assert [next(alone)[1] for _ in range(steps)] == lines[1]["epochs"][epoch]
