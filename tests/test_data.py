import itertools

import numpy as np
import pytest
import torch

from ganforge.tasks.data import TrainStream, iter_split, split_count, train_loader
from ganforge.tasks.params import DataParams
from ganforge.tasks.shard import shard


def _labels_seen(stream: TrainStream, n_batches: int) -> list[torch.Tensor]:
    return [b for b in itertools.islice(iter(stream), n_batches)]


def test_lower_resolutions_are_exact_box_downsamples(digits_shards):
    hi = next(iter(TrainStream(digits_shards, 16, 8, seed=3)))[0]
    lo = next(iter(TrainStream(digits_shards, 4, 8, seed=3)))[0]
    manual = hi.reshape(8, 3, 4, 4, 4, 4).mean(dim=(3, 5))
    assert torch.allclose(lo, manual, atol=1e-6)


def test_stream_batches_range_and_resolution(digits_shards):
    s = TrainStream(digits_shards, 8, 16, seed=1)
    x, y = next(iter(s))
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    assert y.shape == (16,) and set(y.tolist()) <= set(range(10))
    with pytest.raises(ValueError, match="requested 32px"):
        TrainStream(digits_shards, 32, 4)


def _keys_of_part(shards, rank, world, n):
    """Collect the first n samples (as byte fingerprints) a rank reads."""
    s = TrainStream(shards, 8, 1, rank=rank, world_size=world, seed=0, shuffle_buffer=1)
    return [a.tobytes() for a, _ in itertools.islice(s.samples(), n)]


@pytest.mark.parametrize("n_images, shard_size, world", [(40, 100, 3), (40, 7, 2), (45, 20, 4)])
def test_ranks_partition_the_data(tmp_path, n_images, shard_size, world):
    """One shard, uneven shards, fewer shards than ranks: ranks read disjoint parts covering everything."""
    out = tmp_path / "s"
    shard(f"synthetic:gradients:{n_images}", out, DataParams(resolution=8, shard_size=shard_size, val_fraction=0, workers=1), progress=False)
    all_keys = {a.tobytes() for a, _ in ((b[0][i], 0) for b in iter_split(out, "train", 64) for i in range(len(b[0])))}
    seen = []
    for r in range(world):
        per = _keys_of_part(out, r, world, 400)  # several passes of an endless stream
        distinct = set(per)
        seen.append(distinct)
        assert len(per) == 400, "every rank yields endlessly, so all ranks see the same number of batches"
    assert set.union(*seen) == all_keys
    for a, b in itertools.combinations(seen, 2):
        assert not (a & b)


def test_stream_with_loader_workers_and_xflip(digits_shards):
    s = TrainStream(digits_shards, 8, 8, seed=0, xflip=True)
    it = train_loader(s, num_workers=2)
    batches = [next(it) for _ in range(4)]
    assert all(b[0].shape == (8, 3, 8, 8) for b in batches)


def test_iter_split_visits_every_sample_once(digits_shards):
    n = split_count(digits_shards, "val")
    batches = list(iter_split(digits_shards, "val", 7))
    imgs = np.concatenate([b[0] for b in batches])
    assert imgs.shape == (n, 16, 16, 3) and imgs.dtype == np.uint8
    # slices concatenate to the whole, in order
    parts = [np.concatenate([b[0] for b in iter_split(digits_shards, "val", 50, start=a, stop=a + 61)]) for a in range(0, n, 61)]
    assert np.array_equal(np.concatenate(parts), imgs)
    with pytest.raises(ValueError, match="split 'test'"):
        list(iter_split(digits_shards, "test", 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_start_batch_continues_the_same_sequence(digits_shards, workers):
    full = [b[0] for b in itertools.islice(train_loader(TrainStream(digits_shards, 8, 16, seed=5, xflip=True), workers), 7)]
    rest = [b[0] for b in itertools.islice(train_loader(TrainStream(digits_shards, 8, 16, seed=5, xflip=True, start_batch=4), workers), 3)]
    for a, b in zip(full[4:], rest):
        assert torch.equal(a, b)
