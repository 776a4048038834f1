"""The one training loop (pruning.training): it learns, it holds masks, its schedules follow their formulas, and it is
the hand-written AdamW loop it replaced, bit for bit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import VOCAB, calib, tiny_model

import pruning
from pruning.training import RandomWindows, TrainConfig, make_optimizer, make_scheduler, scheduled_lr, train


def fixed_batches(n: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, batch, seq), generator=g)


def lrs(config: TrainConfig) -> list[float]:
    """The learning rate of every step, as :func:`train` sees it (read before each optimiser step)."""
    opt = make_optimizer(torch.nn.Linear(2, 2), config)
    sched = make_scheduler(opt, config)
    out = []
    for _ in range(config.steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_reduces_the_loss_and_restores_the_mode():
    model = tiny_model("llama", layers=1)
    batch = fixed_batches(1)[0]
    losses = train(model, lambda: batch, TrainConfig(steps=20, lr=1e-2))
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    assert not model.training  # tiny_model is in eval mode, and so it stays


def test_masks_stay_exactly_zero():
    model = tiny_model("llama", layers=2)
    before = copy.deepcopy(model)
    masks = pruning.prune(model, calib(), "magnitude", 0.5, "unstructured", progress=False).masks
    train(model, fixed_batches(4), TrainConfig(steps=4, lr=1e-2), masks=masks)
    for name in masks.names():
        p, keep = model.get_parameter(name), masks.keep_mask(name, model.get_parameter(name))
        assert (p[~keep] == 0).all(), name
        assert not torch.equal(p[keep], before.get_parameter(name)[keep]), name  # the kept weights trained
    # detached after the run: a further step moves the pruned weights again
    train(model, fixed_batches(1, seed=1), TrainConfig(steps=1, lr=1e-2, clip_grad_norm=None))
    name = sorted(masks.names())[0]
    assert (model.get_parameter(name)[~masks.keep_mask(name, model.get_parameter(name))] != 0).any()


def test_equals_the_hand_written_loop():
    """Constant lr, clipping 1.0, masks held: the same weights and losses as the loop the benchmark spelt out."""
    model = tiny_model("llama", layers=2, seed=3)
    masks = pruning.prune(model, calib(), "wanda", 0.3, "mlp_neuron", progress=False).masks
    hand, batches = copy.deepcopy(model), fixed_batches(3)
    hand.train()
    masks.attach(hand)
    opt = torch.optim.AdamW(hand.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    want = []
    for ids in batches:
        loss = hand(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hand.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        want.append(float(loss.detach()))
    masks.detach()
    got = train(model, batches, TrainConfig(steps=3, lr=1e-3, betas=(0.9, 0.95)), masks=masks)
    assert got == want
    for (n, a), b in zip(hand.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n


def test_cosine_and_constant_by_hand():
    # steps 10, warm-up round(0.2 · 10) = 2 steps: lr·1/2, lr·2/2; then lr·(m + (1 − m)·½(1 + cos(π·(s − 2)/8)))
    cos = TrainConfig(steps=10, lr=2.0, schedule="cosine", warmup=0.2, min_lr=0.1)
    want = [1.0, 2.0] + [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8))) for s in range(2, 10)]
    assert lrs(cos) == pytest.approx(want, rel=1e-12)
    assert lrs(cos)[6] == pytest.approx(2.0 * 0.55)  # half way through the decay: the mean of lr and min_lr
    assert [scheduled_lr(s, cos) for s in range(10)] == lrs(cos)
    assert lrs(TrainConfig(steps=4, lr=2.0, warmup=0.5)) == [1.0, 2.0, 2.0, 2.0]
    assert lrs(TrainConfig(steps=3, lr=2.0)) == [2.0, 2.0, 2.0]  # no warm-up: the first step is at lr


def test_onecycle_is_torchs():
    # OneCycleLR: from lr/25 up to lr at step pct_start·steps − 1, cosine down to lr/25/10⁴ at the last step; AdamW's
    # β1 cycles the other way (0.95 → 0.85 → 0.95)
    config = TrainConfig(steps=20, lr=2.5, schedule="onecycle", warmup=0.2)  # peak at 0.2 · 20 − 1 = 3
    got = lrs(config)
    assert got[0] == pytest.approx(0.1) and max(got) == pytest.approx(2.5) and got.index(max(got)) == 3
    assert got[-1] == pytest.approx(2.5 / 25 / 1e4)
    opt = make_optimizer(torch.nn.Linear(2, 2), config)
    make_scheduler(opt, config)
    assert opt.param_groups[0]["betas"] == (0.95, 0.999)


def test_weight_decay_groups():
    model = tiny_model("llama", layers=1)
    one = make_optimizer(model, TrainConfig(steps=1, lr=1.0, weight_decay=0.1))
    assert len(one.param_groups) == 1 and one.param_groups[0]["weight_decay"] == 0.1
    two = make_optimizer(model, TrainConfig(steps=1, lr=1.0, weight_decay=0.1, decay_vectors=False))
    decay, no_decay = two.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and no_decay["params"] and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_progress_lines():
    lines: list[str] = []
    train(tiny_model("llama", layers=1), fixed_batches(5), TrainConfig(steps=5, lr=1e-3, log_every=2), log=lines.append)
    assert [line.split()[1] for line in lines] == ["1/5", "3/5", "5/5"]  # every 2 steps and the last one
    assert all("loss" in line and "lr 1.00e-03" in line and "tok/s" in line for line in lines)


def test_random_windows_seeded_contiguous():
    stream = torch.arange(1000)
    a, b = RandomWindows(stream, 8, 3, seed=5), RandomWindows(stream, 8, 3, seed=5)
    first = a()
    assert first.shape == (3, 8) and torch.equal(first, b()) and not torch.equal(a(), first)
    assert (first.diff(dim=1) == 1).all()  # each row is a slice of the stream
    with pytest.raises(ValueError, match="longer than seq_len=8"):
        RandomWindows(torch.arange(8), 8, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps=0 must be >= 1"),
        ({"schedule": "linear"}, r"schedule='linear' must be one of \('constant', 'cosine', 'onecycle'\)"),
        ({"warmup": 1.0}, r"warmup=1.0 must be in \[0, 1\)"),
        ({"min_lr": 2.0}, r"min_lr=2.0 must be in \[0, 1\]"),
        ({"autocast": "fp8"}, "autocast='fp8' must be None or one of"),
        ({"log_every": -1}, "log_every=-1 must be >= 0"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 3, "lr": 1e-3, **kwargs})


def test_batch_source_runs_out():
    with pytest.raises(ValueError, match="ran out after 2 of 3 steps"):
        train(tiny_model("llama", layers=1), fixed_batches(2), TrainConfig(steps=3, lr=1e-3))
