"""Tests for tinyclip.data.shards and the loader's streaming of shards.

The shards are written here with tarfile (``tests/shard_data.py``): every
image is compared with the PNG it was made from, every caption with its
key. The streaming order is checked against its definition worked out by
hand (rank r of D owns shards r, r + D, ..., reads them whole in a seeded
order); resuming mid-epoch from a JSON round trip of ``state()`` gives the
uninterrupted loader's batches exactly, with one or several workers. The
split over real MPI ranks runs in tests/test_loader_workers.py.
"""

import functools
import io
import json
import tarfile

import numpy
import pytest

from tests.shard_data import add_member, example_number, example_pixels, png_bytes, write_shards
from tinyclip.data.loader import BatchOrder, Loader
from tinyclip.data.shards import ShardCaptions, expand_shards, is_shard_pattern
from tinyclip.data.transforms import random_resized_crop


@pytest.mark.parametrize("caption_suffix", ["txt", "json"])
def test_every_example_of_every_shard_is_indexed_with_its_image_and_caption(tmp_path, caption_suffix):
    pattern = write_shards(tmp_path, [3, 5, 2], caption_suffix)
    pairs = ShardCaptions(pattern)
    assert len(pairs) == 10 and pairs.shard_sizes.tolist() == [3, 5, 2]
    numbering = [(0, i) for i in range(3)] + [(1, i) for i in range(5)] + [(2, i) for i in range(2)]
    for number, (shard, index) in enumerate(numbering):
        assert pairs.caption(number) == f"example {shard:03d}{index:03d}"
        assert pairs.path(number).endswith(f"train-{shard:06d}.tar/{shard:03d}{index:03d}.png")
        numpy.testing.assert_array_equal(numpy.asarray(pairs.load(number)), example_pixels(shard, index))


def test_patterns_expand_braces_and_double_colons(tmp_path):
    write_shards(tmp_path, [1, 1, 1])
    names = [str(tmp_path / f"train-{s:06d}.tar") for s in range(3)]
    assert expand_shards(str(tmp_path / "train-{000000..000002}.tar")) == names
    assert expand_shards(f"{names[2]}::{tmp_path}/train-{{000000,000001}}.tar") == [names[2], names[0], names[1]]
    with pytest.raises(ValueError, match="1 of 4 shards do not exist, the first .*train-000003.tar"):
        expand_shards(str(tmp_path / "train-{000000..000003}.tar"))
    assert is_shard_pattern("a/train-{000..009}.tar") and is_shard_pattern("x.tar::y.tar")
    assert not is_shard_pattern("pairs.csv") and not is_shard_pattern("folder")


def test_incomplete_examples_are_skipped_and_counted_and_bad_files_named(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add_member(tar, "dir/1.jpg", png_bytes(example_pixels(0, 0)))     # PNG bytes under .jpg: PIL reads them
        add_member(tar, "dir/1.txt", b"  one  ")
        add_member(tar, "dir/2.png", png_bytes(example_pixels(0, 1)))     # no caption
        add_member(tar, "dir/3.txt", b"no image")
        add_member(tar, "dir/4.png", b"broken")
        add_member(tar, "dir/4.txt", b"four")
    with pytest.warns(UserWarning, match="skipped 2 examples with no image or no caption"):
        pairs = ShardCaptions(str(tmp_path / "a.tar"))
    assert len(pairs) == 2 and pairs.incomplete == 2 and pairs.captions == ["one", "four"]
    with pytest.warns(UserWarning, match="cannot decode image .*a.tar/dir/4.png"):
        assert pairs.load(1) is None
    with pytest.warns(UserWarning, match="skipped 2"):
        strict = ShardCaptions(str(tmp_path / "a.tar"), strict=True)
    with pytest.raises(ValueError, match="cannot decode image .*a.tar/dir/4.png"):
        strict.load(1)
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match="b.tar: not a readable uncompressed tar"):
        ShardCaptions(str(tmp_path / "b.tar"))
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        add_member(tar, "x.json", b"[1, 2]")
    with pytest.raises(ValueError, match="c.tar: x.json is not a JSON object"):
        ShardCaptions(str(tmp_path / "c.tar"))


def stream_by_hand(sizes, seed, epoch, rank, world_size):
    starts = numpy.concatenate([[0], numpy.cumsum(sizes)])
    own = list(range(rank, len(sizes), world_size))
    order = numpy.random.default_rng(numpy.random.SeedSequence([seed, epoch, rank, 2])).permutation(own)
    return [index for shard in order for index in range(starts[shard], starts[shard + 1])]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_rank_streams_its_own_shards_whole_and_together_they_read_all(tmp_path, world_size):
    sizes = [4, 6, 5, 4, 7, 4]
    pairs = ShardCaptions(write_shards(tmp_path, sizes))
    batch_size = 6
    orders = [BatchOrder(pairs, batch_size, seed=3, rank=rank, world_size=world_size, transform=lambda i, rng: i)
              for rank in range(world_size)]
    local = [batch_size // world_size + (rank < batch_size % world_size) for rank in range(world_size)]
    steps = min(sum(sizes[rank::world_size]) // local[rank] for rank in range(world_size))
    assert all(order.steps_per_epoch == steps for order in orders)
    for epoch in range(2):
        seen = []
        for rank, order in enumerate(orders):
            stream = stream_by_hand(sizes, 3, epoch, rank, world_size)
            mine = [index for step in range(steps) for index in order.indices(epoch, step)]
            assert mine == stream[:steps * local[rank]]
            shards_read = {example_number(pairs.caption(index))[0] for index in mine}
            assert shards_read <= set(range(rank, len(sizes), world_size))
            seen += mine
        assert len(seen) == len(set(seen))                                  # no example on two ranks
    if world_size == 3:       # ranks own 4+4, 6+7, 5+4 examples with b = 2: 4 steps, the others drop the rest
        assert steps == 4


def test_too_few_shards_or_examples_for_the_ranks_are_named(tmp_path):
    pairs = ShardCaptions(write_shards(tmp_path, [4, 1]))
    with pytest.raises(ValueError, match="2 shards for 3 ranks"):
        BatchOrder(pairs, 6, rank=0, world_size=3, transform=lambda i, rng: i)
    with pytest.raises(ValueError, match="rank 1's shards .* fewer examples than its share of one batch of 4"):
        BatchOrder(pairs, 4, rank=0, world_size=2, transform=lambda i, rng: i)
    with pytest.raises(ValueError, match="examples= cannot cut"):
        BatchOrder(pairs, 2, examples=3, transform=lambda i, rng: i)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("stop_after", [3, 5, 9])
def test_resuming_shards_mid_epoch_gives_the_uninterrupted_batches_exactly(tmp_path, workers, stop_after):
    pairs = ShardCaptions(write_shards(tmp_path, [5, 3, 6]))
    transform = functools.partial(random_resized_crop, image_size=8, family="clip")
    with Loader(pairs, 4, seed=2, transform=transform, workers=1) as whole:
        expected = [next(whole) for _ in range(12)]                        # 3 steps an epoch: four epochs
    with Loader(pairs, 4, seed=2, transform=transform, workers=workers) as first:
        for _ in range(stop_after):
            next(first)
        state = json.loads(json.dumps(first.state()))
    assert state == {"epoch": stop_after // 3, "step": stop_after % 3, "seed": 2, "batch_size": 4,
                     "examples": 14, "ranks": 1}
    with Loader(pairs, 4, seed=2, transform=transform, start=state, workers=workers) as resumed:
        for images, captions in expected[stop_after:]:
            got_images, got_captions = next(resumed)
            assert got_captions == captions
            numpy.testing.assert_array_equal(got_images, images)


def test_a_shard_state_is_refused_on_another_number_of_ranks(tmp_path):
    pairs = ShardCaptions(write_shards(tmp_path, [4, 4]))
    state = Loader(pairs, 4, transform=lambda i, rng: i, prefetch=0).state()
    with pytest.raises(ValueError, match="cannot resume a loader with ranks=1 as one with ranks=2"):
        Loader(pairs, 4, rank=0, world_size=2, transform=lambda i, rng: i, start=state)
    with pytest.raises(ValueError, match="keys"):
        Loader(pairs, 4, transform=lambda i, rng: i, start={k: v for k, v in state.items() if k != "ranks"})


def test_shards_train_end_to_end_with_a_validation_set(tmp_path):
    from tinyclip import train
    pattern = write_shards(tmp_path, [6, 6])
    rows = "filepath,title\n" + "".join(f"v{i}.png,example 00000{i}\n" for i in range(3))
    for i in range(3):
        (tmp_path / f"v{i}.png").write_bytes(png_bytes(example_pixels(9, i)))
    (tmp_path / "val.csv").write_text(rows)
    config = train.TrainConfig(preset="tiny", model_overrides={"image_size": 16}, steps=4, batch_size=4,
                               warmup_steps=1, log_every=2, eval_every=2, checkpoint_every=0, tokenizer_captions=50,
                               plots=False, data=pattern, val_data=str(tmp_path / "val.csv"), out=str(tmp_path / "run"))
    result = train.train(config)
    assert result.summary["val_images"] == 3 and result.summary["examples_seen"] == 16
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all(r["examples_seen"] == 4 * r["step"] for r in records)


def test_eval_retrieval_reads_shards_as_it_reads_a_csv_of_the_same_images(tmp_path, capsys):
    from tinyclip import checkpoint, models
    from tinyclip.cli import main
    from tinyclip.tokenizer import Tokenizer
    pattern = write_shards(tmp_path, [3, 4])
    pairs = ShardCaptions(pattern)
    rows = "filepath,title\n"
    for number in range(len(pairs)):
        shard, index = example_number(pairs.caption(number))
        (tmp_path / f"{number}.png").write_bytes(png_bytes(example_pixels(shard, index)))
        rows += f"{number}.png,{pairs.caption(number)}\n"
    (tmp_path / "pairs.csv").write_text(rows)
    tokenizer = Tokenizer.train(pairs.captions, vocab_size=530)
    model_dir = tmp_path / "model"
    checkpoint.save(models.CLIP(models.preset("tiny", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot_id),
                                seed=0), str(model_dir))
    tokenizer.save(str(model_dir / "tokenizer.tinyclip.json"))
    results = []
    for data in (pattern, str(tmp_path / "pairs.csv")):
        assert main(["eval", "--model", str(model_dir), "--data", data, "--json"]) == 0
        retrieval = json.loads(capsys.readouterr().out)["retrieval"]
        results.append({key: value for key, value in retrieval.items() if key != "data"})
    assert results[0] == results[1] and results[0]["images"] == 7
