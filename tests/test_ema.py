"""The adapters' moving average (``optim.ema_decay``, :mod:`drpose.training.ema`) in process: the decay, the
average against an independent float64 recurrence, swapping it in for export, and its checkpoint file. The
trainer's use of it (export, resume) is tested in ``tests/test_training.py``."""

from __future__ import annotations

import pytest
import torch

from drpose.training.config import ConfigError
from drpose.training.ema import AdapterEMA, EMAStateError, ema_decay_at


def params(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in shapes]


def test_the_decay_starts_at_zero_warms_up_and_is_capped():
    assert ema_decay_at(1, 0.99) == 0.0
    assert ema_decay_at(2, 0.99) == pytest.approx(2 / 11)
    assert ema_decay_at(3, 0.99) == pytest.approx(3 / 12)
    assert ema_decay_at(81, 0.99) == pytest.approx(0.9)
    assert ema_decay_at(3, 0.2) == 0.2 and ema_decay_at(10_000, 0.999) == 0.999
    with pytest.raises(ValueError, match="count from 1"):
        ema_decay_at(0, 0.9)
    with pytest.raises(ConfigError, match=r"optim.ema_decay must be in \(0, 1\), got 1.0"):
        AdapterEMA(params((2,)), 1.0)


def test_the_average_follows_an_independent_recurrence():
    weights = params((3, 4), (5,))
    ema = AdapterEMA(weights, 0.3)
    gen = torch.Generator().manual_seed(1)
    history = []
    for step in range(1, 8):
        with torch.no_grad():
            for p in weights:
                p.add_(torch.randn(p.shape, generator=gen))
        history.append([p.detach().double().clone() for p in weights])
        ema.update(step)
    for index in range(2):
        expected = history[0][index]  # the first step's weights: decay 0
        for step in range(2, 8):
            decay = min(0.3, step / (step + 9))
            expected = decay * expected + (1 - decay) * history[step - 1][index]
        torch.testing.assert_close(ema.shadow[index].double(), expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ema.shadow[index].double(), history[-1][index]), "the average is not the last step"


def test_the_average_is_swapped_in_and_the_weights_come_back_even_on_error():
    weights = params((4, 2), (3,))
    own = [p.detach().clone() for p in weights]
    ema = AdapterEMA(weights, 0.5)
    ema.shadow = [torch.full_like(s, 7.0) for s in ema.shadow]
    with ema.applied():
        assert all(torch.equal(p, torch.full_like(p, 7.0)) for p in weights)
    assert all(torch.equal(p, w) for p, w in zip(weights, own))
    with pytest.raises(KeyError), ema.applied():
        raise KeyError("export failed")
    assert all(torch.equal(p, w) for p, w in zip(weights, own))


def test_a_zero3_partition_is_averaged_and_swapped_in_place_of_the_parameter():
    """Under ZeRO-3 a rank holds ``ds_tensor`` (its partition) and the parameter itself is empty."""
    weights = params((6,), (4,))
    partitions = [torch.arange(3, dtype=torch.float32) + i for i in range(2)]
    for p, part in zip(weights, partitions):
        p.ds_tensor = part
    ema = AdapterEMA(weights, 0.5)
    assert ema.partitioned and ema.file_name(1) == "ema_rank1.pt"
    for part in partitions:
        part.add_(10)
    ema.update(1)
    assert all(torch.equal(s, part) for s, part in zip(ema.shadow, partitions))
    ema.shadow[0].fill_(-1)
    with ema.applied():
        assert torch.equal(partitions[0], torch.full((3,), -1.0))
    assert torch.equal(partitions[0], torch.arange(3, dtype=torch.float32) + 10)


def test_the_checkpoint_file_round_trips_and_bad_ones_are_named(tmp_path):
    weights = params((3, 2), (2,))
    ema = AdapterEMA(weights, 0.9)
    with torch.no_grad():
        weights[0].add_(1)
    ema.update(1)
    ema.save(tmp_path, rank=0)
    assert (tmp_path / "ema.pt").is_file()
    other = AdapterEMA(params((3, 2), (2,), seed=5), 0.9)
    assert other.load(tmp_path, rank=0)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))

    (tmp_path / "none").mkdir()
    assert not AdapterEMA(weights, 0.9).load(tmp_path / "none", rank=0), "a checkpoint without an average"
    with pytest.raises(EMAStateError, match=r"ema.pt averages 2 adapter tensors, this run has 2; tensor 1 is \(2,\) "
                                            r"there and \(4,\) here"):
        AdapterEMA(params((3, 2), (4,)), 0.9).load(tmp_path, rank=0)
    with pytest.raises(EMAStateError, match="this run has 3; tensor 2 is missing there"):
        AdapterEMA(params((3, 2), (2,), (1,)), 0.9).load(tmp_path, rank=0)
    (tmp_path / "ema.pt").write_bytes((tmp_path / "ema.pt").read_bytes()[:100])
    with pytest.raises(EMAStateError, match=r"ema.pt is damaged"):
        AdapterEMA(weights, 0.9).load(tmp_path, rank=0)
    partitioned = params((3, 2), (2,))
    for p in partitioned:
        p.ds_tensor = p.detach().flatten()[:1].clone()
    with pytest.raises(EMAStateError, match="another ZeRO stage or number of ranks"):
        AdapterEMA(partitioned, 0.9).load(tmp_path, rank=0)
