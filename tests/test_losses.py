"""The fused, chunked distillation loss equals the plain autograd formula (value and gradient), and the plain
formula equals a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from pruning.losses import distillation_loss


@pytest.mark.parametrize(
    "shape, alpha, tau, dtype, tol",
    [
        ((1, 9, 17), 0.0, 1.0, torch.float32, 1e-6),
        ((2, 7, 13), 0.42, 0.5, torch.float32, 1e-6),
        ((3, 5, 11), 1.0, 2.0, torch.float64, 1e-6),
        ((2, 6, 10), 0.3, 0.7, torch.bfloat16, 1e-2),
    ],
)
def test_fused_equals_plain(shape, alpha, tau, dtype, tol):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    zt = torch.randn(*shape, generator=g).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:2], generator=g)
    labels[0, 2] = -100
    fused = distillation_loss(zs, labels, zt, alpha, tau, fused=True, chunk=3)
    (gf,) = torch.autograd.grad(fused, zs)
    plain = distillation_loss(zs, labels, zt, alpha, tau, fused=False)
    (gp,) = torch.autograd.grad(plain, zs)
    assert gf.dtype == zs.dtype
    torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(gf.float(), gp.float(), atol=tol, rtol=tol)


def test_plain_formula_by_hand():
    zs = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])
    zt = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, 1, 0]])
    alpha, tau = 0.25, 0.5

    def log_softmax(v):
        m = max(v)
        s = math.log(sum(math.exp(x - m) for x in v)) + m
        return [x - s for x in v]

    ce, kl = [], []
    for t in range(2):  # positions 0, 1 predict labels 1, 2
        ls = log_softmax(zs[0, t].tolist())
        lt = log_softmax([x / tau for x in zt[0, t].tolist()])
        ce.append(-ls[labels[0, t + 1]])
        kl.append(sum(math.exp(a) * (a - b) for a, b in zip(lt, ls)))
    want = (1 - alpha) * sum(ce) / 2 + alpha * sum(kl) / 2
    for fused in (True, False):
        got = distillation_loss(zs, labels, zt, alpha, tau, fused=fused)
        assert float(got) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_chunked_teacher_logits_equal_full_logits(family):
    from tiny import calib, tiny_model

    from pruning.losses import ChunkedLogits

    model = tiny_model(family, layers=2)
    ids = calib(n=2, seq=12)[0]
    student = torch.randn(*ids.shape, model.config.vocab_size, requires_grad=True)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    lazy = ChunkedLogits(hidden, model.get_output_embeddings())
    torch.testing.assert_close(lazy.full(), full)
    a = distillation_loss(student, ids, lazy, 0.42, 0.5, chunk=5)
    (ga,) = torch.autograd.grad(a, student)
    b = distillation_loss(student, ids, full, 0.42, 0.5, fused=False)
    (gb,) = torch.autograd.grad(b, student)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_collect_gradients_with_a_separate_teacher_equals_the_lifted_one():
    """``collect_gradients(teacher=...)`` (a frozen copy of the original) scores exactly as the lifted teacher."""
    import copy

    from tiny import tiny_model

    import pruning
    from pruning.pipeline import collect_gradients
    from pruning.stats import GradientCollector
    from pruning.structure import ModelStructure

    model = tiny_model("llama", seed=0, attn=None, vocab_size=64, max_position_embeddings=32).train()
    original = copy.deepcopy(model).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 64, (2, 12), generator=g)]
    masks = pruning.prune(model, calib, "magnitude", 0.25, "mlp_neuron", keep_original=True, progress=False).masks
    stats = []
    for kw in ({"masks": masks}, {"teacher": original}):  # without the teacher: the student itself
        coll = GradientCollector(
            model, param_names=(), group_sets=ModelStructure(model).group_sets("mlp_neuron"), group_kinds=("coupled",)
        )
        collect_gradients(model, calib, coll, alpha=0.42, temperature=0.5, progress=False, **kw)
        stats.append({k: s.sums["coupled"].clone() for k, s in coll.group_stats.items()})
    assert stats[0].keys() == stats[1].keys()
    for k in stats[0]:
        assert stats[0][k].abs().sum() > 0
        torch.testing.assert_close(stats[0][k], stats[1][k], rtol=1e-5, atol=1e-7)


def test_kl_over_all_positions_is_the_authors_normalisation():
    """``kl_positions='all'``: CE over the labelled next-token positions, KL averaged over every position of every
    sequence (SDMPrune's code divides the summed KL by seq_len), by hand; fused and plain agree."""
    import torch.nn.functional as F

    from pruning.losses import distillation_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    t, lab = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    lab[0, 2] = -100
    alpha, tau = 0.4, 0.5
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 7), lab[:, 1:].reshape(-1), ignore_index=-100)
    log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t / tau, -1)
    want = (1 - alpha) * ce + alpha * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    (want_grad,) = torch.autograd.grad(want, s)
    for fused in (True, False):
        got = distillation_loss(s, lab, t, alpha, tau, fused=fused, kl_positions="all")
        (grad,) = torch.autograd.grad(got, s)
        torch.testing.assert_close(got.detach(), want.detach())
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    labelled = distillation_loss(s, lab, t, alpha, tau, kl_positions="labelled")
    assert not torch.allclose(labelled, want)  # the default is a different normalisation
