"""Per-sequence gradient statistics from batched backwards (``pruning.stats.SequenceGradients``) equal those of one
backward per sequence: every gradient statistic, gated (Llama) and non-gated (OPT: biases, flattened MLP inputs)
families, every granularity, with padding, per-sequence loss shares, chunks, bf16 autocast and gradient
checkpointing; the weights' own gradients stay autograd's; what a batched backward cannot serve falls back."""

from __future__ import annotations

import pytest
import torch
from tiny import calib, tiny_model

from pruning.losses import distillation_loss
from pruning.pipeline import collect_gradients
from pruning.pipeline.calibration import gradient_pass
from pruning.stats import (
    GRAD_STATS,
    GradientCollector,
    GradientStats,
    GroupGradientStats,
    SequenceGradients,
    token_mean_scales,
)
from pruning.structure import ModelStructure

NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


def model_of(family: str, **kw):
    return tiny_model(family, layers=2, seed=0, **(NO_DROPOUT if family == "opt" else {}), **kw)


def collector(model, granularity: str, kinds=GRAD_STATS, group_kinds=("coupled", "vector")) -> GradientCollector:
    """Element statistics of every targeted weight and bias (or of the group members), group statistics of the
    granularity's sets."""
    s = ModelStructure(model)
    if granularity == "unstructured":
        names = [n + ".weight" for n in s.targets()] + [
            n + ".bias" for n, m in s.targets().items() if m.bias is not None
        ]
        return GradientCollector(model, names, kinds)
    sets = s.group_sets(granularity)
    names = sorted({m.name for gs in sets for m in gs.members}) if kinds else []
    return GradientCollector(model, names, kinds or ("sum",), sets if group_kinds else [], group_kinds or ("coupled",))


def assert_same(got: dict, want: dict) -> None:
    """Equal counts; sums within fp32 tolerance, relative to the largest value of the same statistic in the model
    (a k_proj bias's gradient is 0 up to rounding: its own scale is noise)."""
    scale: dict[str, float] = {}
    for v in want.values():
        for kind, t in v["sums"].items():
            scale[kind] = max(scale.get(kind, 0.0), float(t.abs().max()))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k]["count"] == v["count"], k
        assert set(got[k]["sums"]) == set(v["sums"]), k
        for kind, t in v["sums"].items():
            torch.testing.assert_close(got[k]["sums"][kind], t, rtol=1e-5, atol=1e-6 * scale[kind], msg=f"{k} {kind}")


CASES = [
    ("llama", "unstructured"),
    ("llama", "mlp_neuron"),
    ("llama", "attention_head"),
    ("llama", "query_head"),
    ("opt", "unstructured"),
    ("opt", "mlp_neuron"),
    ("opt", "attention_head"),
    ("phi3", "mlp_neuron"),  # fused gate_up_proj: two members of one weight
    ("phi3", "attention_head"),  # fused qkv_proj: q, k and v slices of one weight
    ("phi3", "query_head"),
    ("gpt_neox", "attention_head"),  # per-head interleaved query_key_value
]


@pytest.mark.parametrize("family,granularity", CASES)
def test_batched_statistics_equal_one_backward_per_sequence(family, granularity):
    model = model_of(family)
    data = calib(n=8, seq=12, seed=3, batch=4)  # 2 micro-batches of 4 sequences
    got, want = collector(model, granularity), collector(model, granularity)
    assert gradient_pass(got) == "batched" and gradient_pass(want, batched=False) == "per_sequence"
    collect_gradients(model, data, got, progress=False)
    collect_gradients(model, data, want, progress=False, batched=False)
    assert all(v["count"] == 8 for v in want.state_dict().values())
    assert_same(got.state_dict(), want.state_dict())
    assert all(p.grad is None for p in model.parameters())
    # the comparison is not vacuous: half the sequences give other statistics
    half = collector(model, granularity)
    collect_gradients(model, data[:1], half, progress=False)
    k = next(k for k in want.state_dict() if k.endswith(".weight"))
    assert not torch.allclose(half.state_dict()[k]["sums"]["sum_sq"], want.state_dict()[k]["sums"]["sum_sq"])


@pytest.mark.parametrize("kinds,group_kinds", [(("sum",), ()), (("sum_abs_gw",), ("vector",)), ((), ("coupled",))])
def test_each_criterion_alone_equals_one_backward_per_sequence(kinds, group_kinds):
    """Taylor's sums (the batch's ``.grad``), SAAP's element and vector terms, SDM's coupled sums, each alone."""
    model = model_of("llama")
    data = calib(n=6, seq=12, seed=4, batch=3)
    got = collector(model, "mlp_neuron", kinds, group_kinds)
    want = collector(model, "mlp_neuron", kinds, group_kinds)
    assert gradient_pass(got) == ("sums" if kinds == ("sum",) else "batched")
    collect_gradients(model, data, got, progress=False)
    collect_gradients(model, data, want, progress=False, batched=False)
    assert_same(got.state_dict(), want.state_dict())


def padded_batch(lengths: list[int], positions: int, seed: int = 5):
    """Right-padded sequences: token ids, attention mask (0 = padding), labels (−100 = padding), and the sequences
    themselves."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(seqs), positions, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask, ids.masked_fill(mask == 0, -100), seqs


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("granularity", ["unstructured", "mlp_neuron"])
def test_padded_batch_with_a_mean_loss_equals_its_sequences_alone(family, granularity):
    """A loss averaged over a padded batch's tokens (as a training step computes it, divided by an accumulation
    count of 2): per-sequence shares scaled back, padding left out, the accumulation undone — the statistics of
    each sequence alone; the gradients are autograd's (the weights' zeros without ``weight_grads``)."""
    model = model_of(family)
    ids, mask, labels, seqs = padded_batch([12, 7, 10, 3, 12, 9], 12)
    want = collector(model, granularity)
    collect_gradients(model, [s[None] for s in seqs], want, progress=False, batched=False)
    grads = []
    for weight_grads in (True, False):
        got = collector(model, granularity)
        got.weight_grads = weight_grads
        got.attach()
        got.begin_batch(ids.shape[0], mask, token_mean_scales(labels))
        got.grad_scale = 2.0
        loss = distillation_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels) / 2
        loss.backward()
        got.end_batch()
        got.detach()
        assert_same(got.state_dict(), want.state_dict())
        grads.append({n: p.grad for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    loss = distillation_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels) / 2
    loss.backward()
    hooked = {n for n in got.parameters if n.endswith(".weight")}
    for n, p in model.named_parameters():
        assert torch.equal(grads[0][n], p.grad), n  # the same products as autograd's
        assert torch.equal(grads[1][n], torch.zeros_like(p) if n in hooked else p.grad), n


def test_token_mean_scales():
    labels = torch.tensor([[1, 2, 3, 4], [1, 2, -100, -100], [1, -100, -100, -100]])
    assert token_mean_scales(labels) == [4 / 3, 4.0, 0.0]  # 3 + 1 + 0 next-token positions
    assert token_mean_scales(torch.tensor([5, 6, 7])) == [1.0]


def test_chunks_of_sequences_give_the_same_statistics():
    """At most ``chunk_elements`` per-sequence values at once (here: one sequence at a time for every layer)."""
    model = model_of("llama")
    s = ModelStructure(model)
    sets = s.group_sets("mlp_neuron")
    names = [n + ".weight" for n in s.targets()]
    ids = calib(n=4, seq=12, seed=6, batch=4)[0]
    out = []
    for chunk in (1 << 24, 1):
        element = {n: GradientStats(GRAD_STATS) for n in names}
        groups = [GroupGradientStats(gs, ("coupled", "vector")) for gs in sets]
        seq = SequenceGradients(model, element, groups, chunk_elements=chunk).attach()
        seq.begin_batch(4)
        distillation_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
        seq.end_batch()
        seq.detach()
        model.zero_grad(set_to_none=True)
        out.append(
            {**{n: st.state_dict() for n, st in element.items()}, **{g.group_set.key: g.state_dict() for g in groups}}
        )
    assert_same(out[1], out[0])
    assert "forward" not in model.get_submodule("model.layers.0.mlp.up_proj").__dict__  # detached


def _hooked_passes(model, rows, batched: bool, checkpointing: bool = False) -> dict:
    """Statistics of training-style passes under bf16 autocast: each tensor of ``rows`` one micro-batch."""
    coll = collector(model, "mlp_neuron", ("sum_sq", "sum_abs_gw")).attach(batched=batched)
    for r in rows:
        coll.begin_batch(r.shape[0], scales=token_mean_scales(r))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=r, use_cache=False).logits
        distillation_loss(logits, r).backward()
        coll.end_batch()
    coll.detach()
    model.zero_grad(set_to_none=True)
    return coll.state_dict()


def test_bf16_autocast_and_gradient_checkpointing():
    """Under autocast the function makes autocast's casts; with gradient checkpointing the recomputed forward adds
    nothing: both equal micro-batches of one sequence read by tensor hooks."""
    model = model_of("llama")
    ids = calib(n=4, seq=12, seed=7, batch=4)[0]
    want = _hooked_passes(model, list(ids[:, None]), batched=False)
    assert_same(_hooked_passes(model, [ids], batched=True), want)
    model.train()
    model.gradient_checkpointing_enable()
    assert_same(_hooked_passes(model, [ids], batched=True), want)


def test_unbatchable_parameters_fall_back_or_need_one_sequence():
    """A tied LM head (its weight is the embeddings') and the embeddings are not a Linear's own: one-shot falls back
    to one backward per sequence; attached, their tensor hooks need micro-batches of one sequence."""
    model = model_of("llama", tie_word_embeddings=True)
    s = ModelStructure(model)
    names = [n + ".weight" for n in s.targets(include_embeddings=True, include_lm_head=True)]
    assert "lm_head.weight" in names or "model.embed_tokens.weight" in names
    coll = GradientCollector(model, names, ("sum_sq",))
    bad = coll.unbatchable()
    assert set(bad) == {"model.embed_tokens.weight"} | ({"lm_head.weight"} & set(names))
    assert "not a plain nn.Linear" in bad["model.embed_tokens.weight"]
    assert gradient_pass(coll) == "per_sequence"
    data = calib(n=4, seq=12, seed=8, batch=2)
    want = GradientCollector(model, names, ("sum_sq",))
    collect_gradients(model, data, coll, progress=False)
    collect_gradients(model, data, want, progress=False, batched=False)
    assert_same(coll.state_dict(), want.state_dict())
    coll.attach()
    with pytest.raises(ValueError, match=r"need micro-batches of one sequence; this one has 2\. HINT: set the data's"):
        coll.begin_batch(2)
    coll.begin_batch(1)
    coll.detach()


def test_tied_head_alone_is_unbatchable():
    model = model_of("llama", tie_word_embeddings=True)
    bad = GradientCollector(model, ["lm_head.weight"], ("sum_sq",)).unbatchable()
    assert bad == {"lm_head.weight": "the parameter is shared with another module (tied)"}
    with pytest.raises(ValueError, match=r"cannot come from a batched backward .* HINT: collect them with one"):
        SequenceGradients(model, {"lm_head.weight": GradientStats(("sum_sq",))})
    # a sum (Taylor) is the batch's .grad, whatever the parameter
    got, want = (GradientCollector(model, ["lm_head.weight"], ("sum",)) for _ in range(2))
    assert gradient_pass(got) == "sums"
    data = calib(n=4, seq=12, seed=9, batch=4)
    collect_gradients(model, data, got, progress=False)
    collect_gradients(model, data, want, progress=False, batched=False)
    assert_same(got.state_dict(), want.state_dict())


def test_a_summed_gradient_gives_sums_only():
    stat = GradientStats(("sum", "sum_sq"))
    with pytest.raises(ValueError, match=r"summed over 4 samples gives the statistic 'sum' only"):
        stat.update(torch.ones(2, 2), samples=4)
    only = GradientStats(("sum",))
    only.update(torch.ones(2, 2), samples=4)
    assert only.count == 4 and only.sums["sum"].tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("kinds,group_kinds", [(("sum_sq",), ()), (("sum_abs_gw",), ("vector",)), ((), ("coupled",))])
def test_weights_train_on_the_sum_of_the_sequences_gradients(family, kinds, group_kinds):
    """Weights that train in a scoring window get ``Σ_n g_n`` from the per-sequence products themselves (no second
    product): autograd's gradient up to fp32 rounding; a coupled column member's (made transposed) too."""
    model = model_of(family).train()
    ids = calib(n=4, seq=12, seed=10, batch=4)[0]
    got = collector(model, "mlp_neuron", kinds, group_kinds).attach()
    got.begin_batch(4, scales=token_mean_scales(ids))
    distillation_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
    got.end_batch()
    got.detach()
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    distillation_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()), msg=n)
    assert got.state_dict()[next(iter(got.state_dict()))]["count"] == 4


@pytest.mark.parametrize("batched", [True, False])
def test_kl_over_all_positions_reaches_the_scoring_pass(batched):
    """``kl_positions='all'`` (SDMPrune's KL / seq_len) in one-shot scoring: the statistics are those of each
    sequence's own loss in that form, computed by hand one sequence at a time; ``labelled`` gives others."""
    model = model_of("llama")
    teacher = model_of("llama")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = calib(n=4, seq=12, seed=6, batch=2)
    name = "model.layers.1.mlp.down_proj.weight"
    alpha, tau = 0.6, 0.5

    def stats(kl_positions):
        coll = GradientCollector(model, [name], ("sum_sq",))
        collect_gradients(
            model,
            data,
            coll,
            alpha=alpha,
            temperature=tau,
            kl_positions=kl_positions,
            teacher=teacher,
            progress=False,
            batched=batched,
        )
        return coll.state_dict()[name]["sums"]["sum_sq"]

    want = torch.zeros_like(model.get_parameter(name))
    for ids in (row[None] for batch in data for row in batch):
        with torch.no_grad():
            target = teacher(input_ids=ids).logits
        loss = distillation_loss(model(input_ids=ids).logits, ids, target, alpha, tau, fused=False, kl_positions="all")
        (g,) = torch.autograd.grad(loss, model.get_parameter(name))
        want += g.pow(2)
    got = stats("all")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert not torch.allclose(stats("labelled"), want, rtol=1e-3)
