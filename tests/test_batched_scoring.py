"""The ImportanceCallback on micro-batches of any size: a batch of 8 (or 4 with accumulation 2) scores exactly what
the core scores one sequence at a time, for every gradient criterion; padded batches; plain tensor, tuple and dict
batches counted by their sequences; the micro-batch opt-out; what a batched backward cannot serve."""

from __future__ import annotations

import copy

import pytest
import torch
from test_lightning import (
    CFG,
    SEQ,
    SEQS,
    Recording,
    UserModule,
    assert_same_masks,
    assert_same_stats,
    loader,
    module,
    prune_core,
    reference_acts,
    reference_grads,
    trainer,
)
from torch.utils.data import DataLoader, TensorDataset

from pruning.callbacks import ImportanceCallback, PruningCallback
from pruning.callbacks.importance import batch_tensors
from pruning.lightning.module import DistillationModule
from pruning.pipeline import collect_gradients
from pruning.schedule import Schedule
from pruning.stats import GradientCollector
from pruning.structure import ModelStructure

CRITERIA = [("sdm", "mlp_neuron", 0.25), ("gblm", "unstructured", 0.5), ("taylor", "mlp_neuron", 0.25)]
CRITERIA += [("saap", "mlp_neuron", 0.25)]


@pytest.mark.parametrize("batch,accumulate", [(8, 1), (4, 2)])
@pytest.mark.parametrize("criterion,granularity,sparsity", CRITERIA)
def test_batch_of_eight_equals_core(criterion, granularity, sparsity, batch, accumulate):
    """One optimiser step of 8 sequences scores them one by one, as the core's one backward per sequence does."""
    m = module(lr=1e-2)
    ref = copy.deepcopy(m.student).eval()
    ic, pc = Recording(), PruningCallback(criterion, granularity, Schedule(step=1, sparsity=sparsity))
    trainer(2, [ic, pc], accumulate_grad_batches=accumulate).fit(m, loader(batch_size=batch))
    assert pc.history[0]["micro_batches_scored_on_rank"] == accumulate
    want = reference_grads(ref, criterion, granularity, SEQS[:8])
    assert all(v["count"] == 8 for v in want.values())
    assert_same_stats(ic.snapshots[0]["gradients"], want)
    if criterion == "gblm":
        assert_same_stats(ic.snapshots[0]["activations"], reference_acts(copy.deepcopy(ref), SEQS[:8]))
    kw = {"sequential": False} if criterion == "gblm" else {}
    assert_same_masks(pc.masks, prune_core(ref, SEQS[:8], criterion, sparsity, granularity, **kw).masks)


def padded(lengths: list[int], seed: int = 11) -> tuple[list[dict], list[torch.Tensor]]:
    """Right-padded samples (attention_mask 0 and label −100 at padding) and the sequences they hold."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in lengths]
    samples = []
    for s in seqs:
        ids, mask = torch.zeros(SEQ, dtype=torch.long), torch.zeros(SEQ, dtype=torch.long)
        ids[: len(s)], mask[: len(s)] = s, 1
        samples.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return samples, seqs


@pytest.mark.parametrize("criterion,granularity", [("sdm", "mlp_neuron"), ("gblm", "unstructured")])
def test_padded_batches_equal_their_sequences_alone(criterion, granularity):
    """Sequences of different lengths padded into batches of 4: each scores as itself, unpadded, in the core."""
    samples, seqs = padded([16, 9, 12, 5, 16, 3, 14, 7] * 2)
    m = module(lr=1e-2)
    ref = copy.deepcopy(m.student).eval()
    ic, pc = Recording(), PruningCallback(criterion, granularity, Schedule(step=2, sparsity=0.25))
    trainer(3, [ic, pc]).fit(m, DataLoader(samples, batch_size=4))
    assert_same_stats(ic.snapshots[0]["gradients"], reference_grads(ref, criterion, granularity, seqs[:8]))
    if criterion == "gblm":  # the padding's tokens are not counted either
        acts = ic.snapshots[0]["activations"]
        assert acts["model.layers.0.mlp.up_proj"]["count"] == sum(len(s) for s in seqs[:8])
        assert_same_stats(acts, reference_acts(copy.deepcopy(ref), seqs[:8]))


class AnyBatchModule(UserModule):
    """A user's module that trains on dicts, plain tensors of token ids or tuples of them (Hugging Face's loss)."""

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0] if isinstance(batch, list) else batch
        return self.model(input_ids=ids, labels=ids).loss


def batches_of(kind: str, batch_size: int) -> DataLoader:
    data = torch.stack(SEQS)
    if kind == "tensor":  # [batch_size, 16] tensors: batch_size sequences, not 16
        return DataLoader(data, batch_size=batch_size)
    if kind == "tuple":  # [tensor] lists
        return DataLoader(TensorDataset(data), batch_size=batch_size)
    return loader(batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
def test_tensor_tuple_and_dict_batches_count_sequences(kind, batch_size):
    m = AnyBatchModule()
    ref = copy.deepcopy(m.model).eval()
    ic, pc = Recording(), PruningCallback("gblm", "unstructured", Schedule(step=2, sparsity=0.5))
    trainer(3, [ic, pc]).fit(m, batches_of(kind, batch_size))
    n = 2 * batch_size
    got = ic.snapshots[0]
    assert got["gradients"]["model.layers.0.mlp.up_proj.weight"]["count"] == n
    assert got["activations"]["model.layers.0.mlp.up_proj"]["count"] == n * SEQ
    assert_same_stats(got["gradients"], reference_grads(ref, "gblm", "unstructured", SEQS[:n]))


def test_micro_batch_opt_out():
    """``per_sample: micro_batch``: a micro-batch of 2 is one sample (the gradient of its mean loss)."""
    ic = Recording(per_sample="micro_batch")
    pc = PruningCallback("sdm", "mlp_neuron", Schedule(step=2))
    trainer(3, [ic, pc]).fit(module(), loader(batch_size=2))
    assert pc.history[0]["micro_batches_scored_on_rank"] == 2
    assert ic.snapshots[0]["gradients"]["mlp_neuron.0"]["count"] == 2
    with pytest.raises(ValueError, match=r"per_sample='sequences' must be 'sequence' or 'micro_batch'"):
        ImportanceCallback(per_sample="sequences")


def test_parameters_a_batch_cannot_serve_need_one_sequence():
    """A tied LM head is read by a tensor hook: micro-batches of one sequence, or a clear refusal."""
    cfg = dict(CFG, tie_word_embeddings=True)
    pc = PruningCallback("taylor", "unstructured", Schedule(step=2, sparsity=0.5), include_lm_head=True)
    with pytest.raises(ValueError, match=r"\['lm_head.weight'\] \(lm_head.weight: the parameter is shared .*this one"):
        trainer(3, [Recording(), pc]).fit(DistillationModule(config=cfg), loader(batch_size=2))
    ic = Recording()
    pc = PruningCallback("taylor", "unstructured", Schedule(step=2, sparsity=0.5), include_lm_head=True)
    m = DistillationModule(config=cfg)
    ref = copy.deepcopy(m.student).eval()
    trainer(3, [ic, pc]).fit(m, loader(batch_size=1))
    names = [n + ".weight" for n in ModelStructure(ref).targets(include_lm_head=True)]
    want = GradientCollector(ref, names, ("sum",))
    collect_gradients(ref, [s[None] for s in SEQS[:2]], want, progress=False, batched=False)
    assert "lm_head.weight" in names
    assert_same_stats(ic.snapshots[0]["gradients"], want.state_dict())


def test_batch_tensors_of_each_kind():
    ids = torch.arange(12).reshape(3, 4)
    mask = torch.ones_like(ids)
    for batch in (ids, (ids,), [ids, mask], {"input_ids": ids}):
        got, labels, none = batch_tensors(batch)
        assert got is ids and labels is ids and none is None
    got, labels, m = batch_tensors({"input_ids": ids, "labels": -ids, "attention_mask": mask})
    assert torch.equal(labels, -ids) and m is mask
    assert batch_tensors(ids[0])[0].shape == (1, 4)  # one sequence
    with pytest.raises(TypeError, match=r"a training batch of list holds no tensor .* HINT: yield dicts"):
        batch_tensors([["a", "b"]])
