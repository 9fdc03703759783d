"""Tests for tinyclip.data.loader: shuffle, sharding, resuming, and the prefetch thread.

Most tests use ``Numbered``, a data set whose example i is an image filled
with i and the caption "i", so a batch shows which examples it holds. The
order checks: each example once per epoch, a new order per epoch and per
seed, the same for the same seed. Sharding: the ranks' batches, put side by
side, are the one-process batch for 1 to 4 ranks, also when they do not
divide the batch. Resuming from a JSON round trip of ``state()`` gives the
batches an uninterrupted loader gives. A caption set on disk goes through
the transform with the same augmentation on any number of ranks.
"""

import functools
import gc
import json
import threading
import traceback

import numpy
import pytest
from PIL import Image

from tinyclip.data.captions import CSVCaptions
from tinyclip.data.loader import BatchOrder, Loader
from tinyclip.data.transforms import random_resized_crop


class Numbered:
    """Unlimited: example i is a 2×2 uint8 image filled with i % 256, with the caption str(i)."""

    def batch(self, indices):
        values = (numpy.asarray(indices) % 256).astype(numpy.uint8)                  # (n,)
        images = numpy.broadcast_to(values[:, None, None, None], (len(indices), 2, 2, 3))
        return images.copy(), [str(i) for i in indices]


class Finite(Numbered):
    """The first ``size`` examples of Numbered."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


def indices_of(batch):
    return [int(caption) for caption in batch[1]]


def take(loader, steps):
    return [indices_of(next(loader)) for _ in range(steps)]


def test_each_example_once_per_epoch_in_a_new_order_each_epoch():
    with Loader(Finite(12), 4, seed=3) as loader:
        assert loader.steps_per_epoch == 3
        epochs = [sum(take(loader, 3), []) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]


def test_an_incomplete_last_batch_is_dropped():
    with Loader(Finite(10), 3) as loader:
        assert loader.steps_per_epoch == 3
        batches = take(loader, 3)
        assert loader.state()["epoch"] == 1 and loader.state()["step"] == 0
    assert all(len(batch) == 3 for batch in batches)
    assert len(set(sum(batches, []))) == 9


def test_the_order_depends_on_the_seed_only():
    def first_epoch(seed):
        with Loader(Finite(64), 8, seed=seed) as loader:
            return take(loader, 8)
    assert first_epoch(1) == first_epoch(1)
    assert first_epoch(1) != first_epoch(2)
    expected = numpy.random.default_rng(numpy.random.SeedSequence([1, 0])).permutation(64)
    assert sum(first_epoch(1), []) == expected.tolist()


@pytest.mark.parametrize("batch_size", [6, 7, 12])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_batches_side_by_side_are_the_one_process_batch(batch_size, world_size):
    dataset = Finite(30)
    with Loader(dataset, batch_size, seed=5, prefetch=0) as single:
        expected = take(single, 7)                  # crosses an epoch boundary
    shards = [take(Loader(dataset, batch_size, seed=5, rank=rank, world_size=world_size, prefetch=0), 7)
              for rank in range(world_size)]
    for step in range(7):
        assert sum((shard[step] for shard in shards), []) == expected[step]
    sizes = [len(shard[0]) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)   # the first ranks take more


def test_uneven_split_is_documented_one():
    sizes = [len(BatchOrder(Finite(20), 10, rank=rank, world_size=4).indices(0, 0)) for rank in range(4)]
    assert sizes == [3, 3, 2, 2]


def test_an_unlimited_data_set_is_walked_in_order():
    order = BatchOrder(Numbered(), 4, rank=1, world_size=2)
    assert order.steps_per_epoch is None
    assert order.indices(0, 0) == [2, 3] and order.indices(0, 5) == [22, 23]
    with Loader(Numbered(), 4) as loader:
        assert take(loader, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
        assert loader.state() == {"epoch": 0, "step": 3, "seed": 0, "batch_size": 4, "examples": None}


def test_examples_makes_an_unlimited_set_finite_and_shuffled():
    with Loader(Numbered(), 4, seed=3, examples=12) as loader:
        assert loader.steps_per_epoch == 3
        epochs = [sum(take(loader, 3), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12)) and epochs[0] != epochs[1]
    with Loader(Finite(20), 4, seed=3, examples=12, prefetch=0) as loader:   # the same 12 of a finite set
        assert sum(take(loader, 3), []) == epochs[0]
    with pytest.raises(ValueError, match=r"examples must be an int in \[1, 20\]"):
        Loader(Finite(20), 4, examples=21)


@pytest.mark.parametrize("dataset", [Finite(10), Numbered()], ids=["finite", "unlimited"])
@pytest.mark.parametrize("stop_after", [0, 2, 3, 5])
def test_resuming_continues_with_the_batch_an_uninterrupted_loader_gives(dataset, stop_after):
    with Loader(dataset, 3, seed=7) as uninterrupted:
        expected = take(uninterrupted, 8)
    with Loader(dataset, 3, seed=7) as first_run:
        assert take(first_run, stop_after) == expected[:stop_after]
        saved = json.loads(json.dumps(first_run.state()))
    with Loader(dataset, 3, seed=7, start=saved) as resumed:
        assert take(resumed, 8 - stop_after) == expected[stop_after:]


def test_a_state_resumes_on_another_number_of_ranks():
    with Loader(Finite(20), 6, seed=4, prefetch=0) as single:
        take(single, 2)
        saved = single.state()
        expected = take(single, 4)
    ranks = [Loader(Finite(20), 6, seed=4, rank=rank, world_size=4, start=saved) for rank in range(4)]
    for step in range(4):
        assert sum((indices_of(next(rank)) for rank in ranks), []) == expected[step]
    for rank in ranks:
        rank.close()


def test_the_shapes_set_fits_as_an_unlimited_data_set():
    from tinyclip.data.shapes import ShapesDataset
    shapes = ShapesDataset(seed=1, image_size=32)
    with Loader(shapes, 5, prefetch=0) as single:
        images, captions = next(single)
    assert images.shape == (5, 32, 32, 3) and images.dtype == numpy.uint8 and len(captions) == 5
    shards = [next(Loader(shapes, 5, rank=rank, world_size=2, prefetch=0)) for rank in range(2)]
    numpy.testing.assert_array_equal(numpy.concatenate([shard[0] for shard in shards]), images)
    assert shards[0][1] + shards[1][1] == captions


def test_load_state_rewinds_a_running_loader():
    with Loader(Finite(10), 2, seed=1, prefetch=3) as loader:
        start = loader.state()
        first = take(loader, 4)
        loader.load_state(start)
        assert take(loader, 4) == first


def test_a_state_from_another_seed_or_batch_size_is_refused():
    with Loader(Finite(10), 2, seed=1) as loader:
        state = loader.state()
    with pytest.raises(ValueError, match="seed=1"):
        Loader(Finite(10), 2, seed=2, start=state)
    with pytest.raises(ValueError, match="batch_size=2"):
        Loader(Finite(10), 5, seed=1, start=state)
    with pytest.raises(ValueError, match="step=5"):
        Loader(Finite(10), 2, seed=1, start=dict(state, step=5))


class Failing(Finite):
    def batch(self, indices):
        if 0 in indices:
            raise ZeroDivisionError("example 0 is broken")
        return super().batch(indices)


def test_an_error_on_the_loading_thread_reaches_the_consumer_with_its_traceback():
    loader = Loader(Failing(4), 1, seed=0)
    with pytest.raises(ZeroDivisionError, match="example 0 is broken") as error:
        take(loader, 4)
    assert "batch" in [frame.name for frame in traceback.extract_tb(error.value.__traceback__)]
    failed_at = loader.state()
    with pytest.raises(ZeroDivisionError):                       # the position is kept: the same batch fails again
        next(loader)
    assert loader.state() == failed_at
    loader.close()


def loader_threads():
    return [thread for thread in threading.enumerate() if thread.name == "tinyclip-loader"]


def test_the_thread_ends_on_close_on_leaving_with_and_when_dropped():
    before = len(loader_threads())
    loader = Loader(Numbered(), 2, prefetch=2)
    next(loader)
    assert len(loader_threads()) == before + 1
    loader.close()
    assert len(loader_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
    with Loader(Numbered(), 2) as loader:
        next(loader)
    assert len(loader_threads()) == before
    dropped = Loader(Numbered(), 2)
    next(dropped)
    thread = loader_threads()[-1]
    del dropped
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_the_loader_checks_its_arguments():
    with pytest.raises(ValueError, match="cannot give each of 4 ranks"):
        Loader(Finite(10), 3, world_size=4)
    with pytest.raises(ValueError, match="rank must be"):
        Loader(Finite(10), 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        Loader(Finite(3), 4)
    with pytest.raises(TypeError, match="not a data set"):
        Loader([1, 2, 3], 1)
    with pytest.raises(ValueError, match="transform is for caption sets"):
        Loader(Finite(10), 2, transform=lambda image, rng: image)


@pytest.mark.parametrize("prefetch, workers", [(0, 1), (2, 1), (2, 2)])
def test_caption_transform_turns_each_batch_of_captions_on_the_loading_thread(prefetch, workers):
    threads = []

    def tokenize(captions):       # stands for a tokenizer: a batch of captions -> one array
        threads.append(threading.current_thread().name)
        return numpy.asarray([int(caption) for caption in captions])

    with Loader(Finite(12), 3, seed=2, prefetch=prefetch, workers=workers) as plain, \
            Loader(Finite(12), 3, seed=2, prefetch=prefetch, workers=workers, caption_transform=tokenize) as loader:
        for _ in range(6):                                # two epochs
            images, captions = next(plain)
            transformed_images, ids = next(loader)
            numpy.testing.assert_array_equal(transformed_images, images)
            numpy.testing.assert_array_equal(ids, [int(caption) for caption in captions])
    # on the loading thread when there is one (never in a worker process, whose calls this list would not see)
    assert threads and set(threads) == ({"MainThread"} if prefetch == 0 else {"tinyclip-loader"})
    with pytest.raises(ValueError, match="caption_transform must be callable"):
        Loader(Finite(12), 3, caption_transform="tokenizer")


class Miscounting(Finite):
    def batch(self, indices):
        images, captions = super().batch(indices)
        return images, captions[:-1]


def test_a_batch_of_the_wrong_length_is_an_error_naming_the_data_set():
    with Loader(Miscounting(10), 2, prefetch=0) as loader:
        with pytest.raises(ValueError, match="Miscounting.batch gave 2 images and 1 captions for 2 indices"):
            next(loader)


@pytest.fixture
def caption_set(tmp_path):
    """Eight 12×10 images on disk, image k filled with 20·k, one of them missing and one not an image."""
    rows = ["filepath,title"]
    for k in range(8):
        if k == 2:
            (tmp_path / "2.png").write_bytes(b"not a picture")
        elif k != 5:
            Image.fromarray(numpy.full((10, 12, 3), 20 * k, numpy.uint8)).save(tmp_path / f"{k}.png")
        rows.append(f"{k}.png,caption {k}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_caption_sets_are_augmented_alike_on_any_number_of_ranks(caption_set):
    crop = functools.partial(random_resized_crop, image_size=6, family="siglip", scale=(0.3, 1.0))
    with pytest.warns(UserWarning, match="unreadable"):
        with Loader(CSVCaptions(caption_set), 4, seed=2, transform=crop) as single:
            expected = [next(single) for _ in range(4)]
    for images, captions in expected:
        assert images.shape == (4, 6, 6, 3) and images.dtype == numpy.float32
        assert "caption 2" not in captions and "caption 5" not in captions
    for world_size in (2, 3):
        dataset = CSVCaptions(caption_set)
        ranks = [Loader(dataset, 4, seed=2, rank=rank, world_size=world_size, transform=crop, prefetch=0)
                 for rank in range(world_size)]
        with pytest.warns(UserWarning, match="unreadable"):
            for images, captions in expected:
                shards = [next(rank) for rank in ranks]
                numpy.testing.assert_array_equal(numpy.concatenate([shard[0] for shard in shards]), images)
                assert sum((shard[1] for shard in shards), []) == captions
        assert dataset.unreadable == 2


def test_an_unreadable_image_is_replaced_by_the_next_readable_pair(caption_set):
    dataset = CSVCaptions(caption_set)
    order = BatchOrder(dataset, 8, transform=lambda image, rng: numpy.asarray(image))
    with pytest.warns(UserWarning, match="unreadable"):
        images, captions = order.load(0, 0)
    by_index = dict(zip(order.indices(0, 0), captions))
    assert by_index[2] == "caption 3" and by_index[5] == "caption 6"
    assert [caption for index, caption in by_index.items() if index not in (2, 5)] == \
        [f"caption {index}" for index in by_index if index not in (2, 5)]
    assert images[order.indices(0, 0).index(2), 0, 0, 0] == 60
