"""Lightning DDP (2 CPU ranks, gloo): statistics gathered on both ranks, all-reduced, equal those of one process over
the same sequences, and both ranks hold bit-identical masks; for a tiny Mixtral (``CASES``: whole experts by REAP,
expert neurons by Taylor) also the masked model's logits (the masked router) and the compacted model.

The 2-rank run is this file executed as a script in a subprocess (``python tests/test_lightning_ddp.py OUT CASE``):
Lightning's ``ddp`` strategy then starts rank 1 by re-running the same command, which is more robust inside pytest
than spawning from the test process. Each rank sees every other sequence, in micro-batches of 2 (1 where a
gradient criterion reads the 3-D expert weights; the sampler is chosen here, ``shuffle=False``); the single-process
reference sees both halves in one step with ``accumulate_grad_batches=2``, so both runs score the same sequences at
the same optimiser steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_lightning import (  # noqa: E402
    SEQS,
    Recording,
    assert_pruned_zero,
    assert_same_masks,
    assert_same_stats,
    loader,
    module,
)
from tiny import tiny_config_dict  # noqa: E402

from pruning import compact  # noqa: E402
from pruning.callbacks import PruningCallback  # noqa: E402
from pruning.schedule import Event, Schedule  # noqa: E402

# case -> (criterion, granularity, events, family, sequences per micro-batch)
CASES = {
    # SDMPrune's two stages: group (coupled) gradient statistics, the lifted teacher under DDP
    "sdm": ("sdm", "mlp_neuron", [Event(2, 0.1), Event(4, 0.3, alpha=0.42, temperature=0.5)], "llama", 2),
    # GBLM: activation statistics and per-weight gradient statistics (Σg²) together
    "gblm": ("gblm", "unstructured", [Event(2, 0.5)], "llama", 2),
    # a tiny Mixtral: whole experts by REAP's routing statistics (1 of 4 experts per layer), the masked router after
    "mixtral_reap": ("reap", "expert", [Event(2, 0.25)], "mixtral", 2),
    # ... and expert neurons by Taylor's gradient statistics of the 3-D expert weights (not Linears: one sequence
    # per micro-batch)
    "mixtral_taylor": ("taylor", "expert_neuron", [Event(2, 0.25)], "mixtral", 1),
}
MAX_STEPS = 6  # events at 2 (and 4), then recovery steps that change weights (gradients averaged over ranks)
# weights after recovery steps (AdamW, lr 1e-2): the ranks' means of 2 sequences averaged vs one process's
# accumulated micro-batches sum in another order, and AdamW's normalisation lifts that rounding to up to ~1e-5 on
# weights with tiny gradients; a gradient in a wrong direction is off by a good part of an update (~1e-2)
WEIGHT_ATOL = 5e-5


def _module(family: str, **kw):
    return module(config=tiny_config_dict(family), **kw) if family != "llama" else module(**kw)


def run(case: str, world: int) -> tuple[dict, object]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler

    criterion, granularity, events, family, batch = CASES[case]
    m = _module(family, lr=1e-2, weight_decay=0.1)
    ic = Recording()
    pc = PruningCallback(criterion, granularity, Schedule(kind="steps", events=events))
    kw = dict(strategy="ddp", devices=2) if world == 2 else dict(devices=1, accumulate_grad_batches=2)
    tr = pl.Trainer(
        accelerator="cpu",
        max_steps=MAX_STEPS,
        callbacks=[ic, pc],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **kw,
    )
    data = loader(SEQS, batch_size=batch)
    if world == 2:
        # Lightning 2.6's own DistributedSampler for a training loader always shuffles (it ignores the loader's
        # shuffle=False), so the ranks' sequences are chosen here: rank r sees r, r + 2, r + 4, ...
        sampler = DistributedSampler(data.dataset, num_replicas=2, rank=tr.global_rank, shuffle=False)
        data = DataLoader(data.dataset, batch_size=batch, sampler=sampler)
    tr.fit(m, data)
    m.student.eval()
    with torch.no_grad():  # the masked model after the events (a masked router routes to kept experts only)
        logits = m.student(input_ids=torch.stack(SEQS[:4])).logits
    out = {
        "logits": logits,
        "rank": tr.global_rank,
        "world": tr.world_size,
        "snapshots": ic.snapshots,
        "masks": pc.masks.state_dict(),
        "history": pc.history,
        "weights": {k: v.detach().clone() for k, v in m.student.state_dict().items()},
    }
    return out, pc.masks


def _masks(state: dict):
    from pruning import MaskSet

    masks = MaskSet()
    masks.load_state_dict(state)
    return masks


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_two_ranks_equal_one_process(tmp_path, case):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), case],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)

    criterion, granularity, events, family, batch = CASES[case]
    want, want_masks = run(case, world=1)
    n_events = len(events)
    assert len(want["history"]) == n_events
    for r in ranks:
        # each rank scored 2 micro-batches of `batch` of the 4 * batch sequences of every event window; the
        # statistics are the sum over ranks
        assert [h["micro_batches_scored_on_rank"] for h in r["history"]] == [2] * n_events
        assert [h["micro_batches_scored_on_rank"] for h in want["history"]] == [4] * n_events
        assert len(r["snapshots"]) == n_events
        for got, exp in zip(r["snapshots"], want["snapshots"]):
            assert (got["samples"], exp["samples"]) == (2, 4)  # micro-batches on this rank
            if exp["gradients"] is not None:  # sequences, over both ranks
                assert all(v["count"] == 4 * batch for v in exp["gradients"].values())
            for kind in ("activations", "gradients"):
                assert (got[kind] is None) == (exp[kind] is None)
                if exp[kind] is not None:
                    assert_same_stats(got[kind], exp[kind], kind + "/")
        # identical masks on both ranks and equal to one process's
        assert_same_masks(_masks(r["masks"]), want_masks)
        # the recovery steps after the events: DDP-averaged gradients = one process's accumulated ones
        for k, v in want["weights"].items():
            torch.testing.assert_close(r["weights"][k], v, rtol=1e-4, atol=WEIGHT_ATOL, msg=k)
        # the masked model's logits (MoE: the masked router's choice among the kept experts) = one process's
        torch.testing.assert_close(r["logits"], want["logits"], rtol=1e-4, atol=1e-4)
        model = _module(family)
        model.student.load_state_dict(r["weights"])
        assert_pruned_zero(model.student, want_masks)
    for k, v in ranks[0]["weights"].items():  # DDP keeps the ranks' weights bit-identical
        assert torch.equal(ranks[1]["weights"][k], v), k
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    if family != "llama":
        # the compacted export of the ranks' weights and masks = that of one process's (fewer experts / neurons)
        def compacted(weights, masks):
            m = _module(family).student
            m.load_state_dict(weights)
            compact(m, masks)
            return m.eval()

        got, exp = compacted(ranks[0]["weights"], _masks(ranks[0]["masks"])), compacted(want["weights"], want_masks)
        got_sd, exp_sd = got.state_dict(), exp.state_dict()
        assert {k: v.shape for k, v in got_sd.items()} == {k: v.shape for k, v in exp_sd.items()}
        assert sum(v.numel() for v in exp_sd.values()) < sum(p.numel() for p in _module(family).student.parameters())
        for k, v in exp_sd.items():
            torch.testing.assert_close(got_sd[k], v, rtol=1e-4, atol=WEIGHT_ATOL, msg=k)
        if granularity == "expert":
            assert got.config.num_local_experts == 3 == exp.config.num_local_experts
        with torch.no_grad():  # the compacted model computes what the masked one did
            torch.testing.assert_close(got(input_ids=torch.stack(SEQS[:4])).logits, r["logits"], rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    out_dir, case_name = Path(sys.argv[1]), sys.argv[2]
    result, _ = run(case_name, world=2)
    torch.save(result, out_dir / f"rank{result['rank']}.pt")
