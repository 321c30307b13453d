"""Online views at the official code's speed (issue 28): one decoding pool per run, only the kept batches' images
encoded, and the same pixels and features as one fresh ``torch.manual_seed`` draw per image."""

import pytest
import torch

from taskres.backbones import load_backbone
from taskres.data.images import ImageViews, build_transform, online_seed, read_image
from taskres.engine import OptimConfig, fit
from taskres.methods.taskres import TaskResHead
from taskres.views import OnlineViews


@pytest.fixture()
def tiny(openai_rn_file):
    return load_backbone(str(openai_rn_file))


def train_images(image_dir, n=6):
    names = [f"train/{c}_{i}.png" for i in range(n) for c in ("red", "green", "blue")]
    return [str(image_dir / n) for n in names], names


def reference_pixels(tiny, paths, seeds):
    """Each draw as one image used to be made: its own saved RNG, ``torch.manual_seed(seed)``, the train transform."""
    transform = build_transform(tiny.image_size, tiny.mean, tiny.std, augment=True)
    out = []
    for path, seed in zip(paths, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out.append(transform(read_image(path)))
    return torch.stack(out)


def test_a_batch_of_draws_has_the_pixels_of_one_manual_seed_per_image_and_leaves_the_global_rng(tiny, split_dataset):
    image_dir, _ = split_dataset
    paths, names = train_images(image_dir, 2)
    seeds = [online_seed(3, 1, n) for n in names]
    data = ImageViews(paths, tiny.image_size, tiny.mean, tiny.std, augment=True)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    items = data.__getitems__([(i, s) for i, s in enumerate(seeds)])
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.stack([pixels for _, pixels, _ in items]), reference_pixels(tiny, paths, seeds))
    assert [i for i, _, _ in items] == list(range(len(paths))) and all(e == "" for _, _, e in items)
    seeded = ImageViews(paths, tiny.image_size, tiny.mean, tiny.std, seeds)  # the bank views' form: seeds by index
    assert torch.equal(seeded[1][1], items[1][1])
    with pytest.raises(Exception, match="as \\(index, seed\\)"):
        data[0]


def test_an_epoch_encodes_only_the_rows_asked_for(tiny, split_dataset):
    image_dir, _ = split_dataset
    paths, names = train_images(image_dir)
    # encoder batches of one image: the CPU encoder may round the last bit differently in batches of other sizes
    every = OnlineViews(tiny, paths, names, seed=5, batch_size=1).epoch(2)
    views = OnlineViews(tiny, paths, names, seed=5, batch_size=1)
    rows = torch.tensor([7, 0, 11, 3, 16])
    some = views.epoch(2, rows)
    assert views.encoded == 5
    assert torch.equal(some[rows], every[rows])
    batched = OnlineViews(tiny, paths, names, seed=5, batch_size=4).epoch(2, rows)
    torch.testing.assert_close(batched[rows], every[rows], rtol=1e-5, atol=1e-6)
    left = torch.ones(len(paths), dtype=torch.bool)
    left[rows] = False
    assert not some[left].any()


def test_one_pool_serves_every_epoch_and_close_stops_its_workers(tiny, split_dataset):
    image_dir, _ = split_dataset
    paths, names = train_images(image_dir)
    alone = OnlineViews(tiny, paths, names, seed=2, batch_size=4, workers=0)
    pooled = OnlineViews(tiny, paths, names, seed=2, batch_size=4, workers=1)
    first = pooled.epoch(0)
    pool, iterator = pooled._pool, pooled._pool._iterator
    workers = list(iterator._workers)
    assert torch.equal(pooled.epoch(1), alone.epoch(1)) and torch.equal(first, alone.epoch(0))
    assert pooled._pool is pool and pool._iterator is iterator  # the same worker processes
    assert all(w.is_alive() for w in workers)
    assert torch.equal(pooled.bank(2), alone.bank(2))
    pooled.close()
    assert pooled._pool is None and not any(w.is_alive() for w in workers)
    assert torch.equal(pooled.epoch(1), alone.epoch(1))  # a new pool after close
    pooled.close()


class EveryRow(OnlineViews):
    """Online views as before issue 28: every image of every epoch encoded, dropped batch or not."""

    def epoch(self, epoch, rows=None):
        return super().epoch(epoch)


@pytest.mark.parametrize("batch_size", [4, 32])
def test_fit_encodes_the_kept_batches_only_and_trains_as_when_it_encoded_every_image(tiny, split_dataset, batch_size):
    image_dir, _ = split_dataset
    paths, names = train_images(image_dir)  # 18 images: batches of 4 keep 16 a epoch; one batch of 32 keeps all
    labels = torch.arange(3).repeat(6)
    config = OptimConfig(lr=1e-2, epochs=3, batch_size=batch_size)
    heads, sources = [], []
    for cls in (OnlineViews, EveryRow):
        torch.manual_seed(0)
        head = TaskResHead(torch.randn(3, tiny.embed_dim), 100.0)
        source = cls(tiny, paths, names, seed=1, batch_size=1)  # the same features, whatever the rows encoded
        history = fit(head, source, labels, config, seed=1, quiet=True)
        heads.append((head.state_dict(), history))
        sources.append(source)
    (kept_state, kept_log), (every_state, every_log) = heads
    assert kept_log == every_log
    assert all(torch.equal(kept_state[k], every_state[k]) for k in kept_state)
    kept = 16 if batch_size == 4 else 18
    assert sources[0].encoded == 3 * kept and sources[1].encoded == 3 * 18
    assert sources[0]._pool is None  # fit closed the pool
