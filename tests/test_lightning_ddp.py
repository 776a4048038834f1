"""Lightning DDP (2 CPU ranks, gloo): statistics gathered on both ranks, all-reduced, equal those of one process over
the same sequences, and both ranks hold bit-identical masks.

The 2-rank run is this file executed as a script in a subprocess (``python tests/test_lightning_ddp.py OUT CRIT``):
Lightning's ``ddp`` strategy then starts rank 1 by re-running the same command, which is more robust inside pytest
than spawning from the test process. Each rank sees every other sequence (Lightning inserts a DistributedSampler,
``shuffle=False``); the single-process reference sees both halves in one step with ``accumulate_grad_batches=2``,
so both runs score the same sequences at the same optimiser steps.
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

from pruning.callbacks import PruningCallback  # noqa: E402
from pruning.schedule import Event, Schedule  # noqa: E402

SCHEDULES = {
    # SDMPrune's two stages: group (coupled) gradient statistics, the lifted teacher under DDP
    "sdm": ("mlp_neuron", [Event(2, 0.1), Event(4, 0.3, alpha=0.42, temperature=0.5)]),
    # GBLM: activation statistics and per-weight gradient statistics (Σg²) together
    "gblm": ("unstructured", [Event(2, 0.5)]),
}
MAX_STEPS = 6  # events at 2 (and 4), then recovery steps that change weights (gradients averaged over ranks)


def run(criterion: str, world: int) -> tuple[dict, object]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler

    granularity, events = SCHEDULES[criterion]
    m = module(lr=1e-2, weight_decay=0.1)
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
    data = loader(SEQS)
    if world == 2:
        # Lightning 2.6's own DistributedSampler for a training loader always shuffles (it ignores the loader's
        # shuffle=False), so the ranks' sequences are chosen here: rank r sees r, r + 2, r + 4, ...
        sampler = DistributedSampler(data.dataset, num_replicas=2, rank=tr.global_rank, shuffle=False)
        data = DataLoader(data.dataset, batch_size=1, sampler=sampler)
    tr.fit(m, data)
    out = {
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
@pytest.mark.parametrize("criterion", list(SCHEDULES))
def test_ddp_two_ranks_equal_one_process(tmp_path, criterion):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), criterion],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)

    want, want_masks = run(criterion, world=1)
    n_events = len(SCHEDULES[criterion][1])
    assert len(want["history"]) == n_events
    for r in ranks:
        # each rank scored 2 of the 4 sequences of every event window; the statistics are the sum over ranks
        assert [h["micro_batches_scored_on_rank"] for h in r["history"]] == [2] * n_events
        assert [h["micro_batches_scored_on_rank"] for h in want["history"]] == [4] * n_events
        assert len(r["snapshots"]) == n_events
        for got, exp in zip(r["snapshots"], want["snapshots"]):
            assert (got["samples"], exp["samples"]) == (2, 4)  # micro-batches on this rank
            for kind in ("activations", "gradients"):
                assert (got[kind] is None) == (exp[kind] is None)
                if exp[kind] is not None:
                    assert_same_stats(got[kind], exp[kind], kind + "/")
        # identical masks on both ranks and equal to one process's
        assert_same_masks(_masks(r["masks"]), want_masks)
        # the recovery steps after the events: DDP-averaged gradients = one process's accumulated ones
        for k, v in want["weights"].items():
            torch.testing.assert_close(r["weights"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        model = module()
        model.student.load_state_dict(r["weights"])
        assert_pruned_zero(model.student, want_masks)
    for k, v in ranks[0]["weights"].items():  # DDP keeps the ranks' weights bit-identical
        assert torch.equal(ranks[1]["weights"][k], v), k


if __name__ == "__main__":
    out_dir, crit = Path(sys.argv[1]), sys.argv[2]
    result, _ = run(crit, world=2)
    torch.save(result, out_dir / f"rank{result['rank']}.pt")
