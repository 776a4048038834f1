"""FSDP2 through Lightning's ModelParallelStrategy (2 CPU ranks, gloo): statistics, group scores and masks equal a
single process on the same sequences, masked weights stay zero through recovery on the sharded weights, a resumed
sharded run ends with the same masks, and the export gathered from the shards equals a single-process export.

The 2-rank runs are ``tests/fsdp_script.py`` in a subprocess (Lightning starts rank 1 by re-running the command).
Rank r sees sequences r, r + 2, ...; the single-process reference sees both in one optimiser step with
``accumulate_grad_batches=2``, so both score the same sequences at the same steps (as in test_lightning_ddp.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_script import SCHEDULES, run  # noqa: E402
from test_lightning import CFG, assert_pruned_zero, assert_same_masks, assert_same_stats, module  # noqa: E402

from pruning import MaskSet, compact, save_pretrained  # noqa: E402

SCRIPT = Path(__file__).parent / "fsdp_script.py"


def _two_ranks(tmp_path: Path, criterion: str, mode: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), criterion, mode],
                          cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    return ranks


def _masks(state: dict) -> MaskSet:
    out = MaskSet()
    out.load_state_dict(state)
    return out


def _export(weights: dict, masks_state: dict, path: Path) -> Path:
    """The single-process export path (ExportOnFitEnd without FSDP): a plain model, compacted, written."""
    m = module()
    m.student.load_state_dict(weights)
    masks = _masks(masks_state)
    if masks.groups:
        compact(m.student, masks)
    return save_pretrained(m.student, path)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("criterion", list(SCHEDULES))
def test_fsdp_two_ranks_equal_one_process(tmp_path, criterion):
    ranks = _two_ranks(tmp_path, criterion, "full")
    want = run(criterion, world=1)
    n_events = len(SCHEDULES[criterion][1])
    want_masks = _masks(want["masks"])
    for r in ranks:
        info = r["info"]
        # sharded by rows over the 2 ranks; the mask of a sharded weight is a DTensor with its placements
        assert info["dtensor"] and info["placements"] == ["S(0)"], info
        assert info["local_shape"][0] * 2 == info["global_shape"][0]
        assert info["mask_dtensor"] and info["mask_placements"] == info["placements"]
        assert not info["local_weight"][~info["mask_local"]].any()  # pruned entries of the local shard are 0
        # statistics: each rank scored 2 of the 4 sequences of every window; summed over ranks = one process
        assert [h["micro_batches_scored_on_rank"] for h in r["history"]] == [2] * n_events
        assert len(r["snapshots"]) == n_events
        for got, exp in zip(r["snapshots"], want["snapshots"]):
            for kind in ("activations", "gradients"):  # gradients: element Σg² or the coupled group scores
                assert (got[kind] is None) == (exp[kind] is None)
                if exp[kind] is not None:
                    assert_same_stats(got[kind], exp[kind], kind + "/")
        assert_same_masks(_masks(r["masks"]), want_masks)
    if criterion == "sdm":  # the lifted teacher (alpha > 0 in the second window) ran on the sharded weights
        assert ranks[0]["teacher_stash"]
    # recovery steps on the shards (gradients reduce-scattered, averaged) = one process's accumulated steps
    got_w = ranks[0]["weights"]  # gathered to rank 0
    assert set(got_w) == set(want["weights"])
    for k, v in want["weights"].items():
        torch.testing.assert_close(got_w[k], v, rtol=1e-4, atol=1e-6, msg=k)
    m = module()
    m.student.load_state_dict(got_w)
    assert_pruned_zero(m.student, want_masks)

    # export: the files gathered from the shards = the single-process export of the same weights and masks
    fsdp_dir = tmp_path / "export_fsdp"
    same = _export(got_w, ranks[0]["masks"], tmp_path / "export_same")
    got_t, same_t = _tensors(fsdp_dir), _tensors(same)
    assert set(got_t) == set(same_t)
    for k in same_t:
        assert torch.equal(got_t[k], same_t[k]), k
    assert json.loads((fsdp_dir / "config.json").read_text()) == json.loads((same / "config.json").read_text())
    # ... and close to the export of the single-process run (same masks, weights equal up to fp32 reduction order)
    ref_t = _tensors(_export(want["weights"], want["masks"], tmp_path / "export_single"))
    assert {k: v.shape for k, v in ref_t.items()} == {k: v.shape for k, v in got_t.items()}
    for k in ref_t:
        torch.testing.assert_close(got_t[k], ref_t[k], rtol=1e-4, atol=1e-6, msg=k)
    if criterion == "sdm":
        cfg = json.loads((fsdp_dir / "config.json").read_text())
        assert cfg["intermediate_size"] < CFG["intermediate_size"] or "intermediate_sizes" in str(cfg)


def test_fsdp_resume_mid_window(tmp_path):
    """A run stopped at step 3 (event 2 at step 4 half-scored: step 2 before the checkpoint, step 3 after), saved as
    a sharded checkpoint and resumed in a new trainer ends with the single-process masks and weights."""
    ranks = _two_ranks(tmp_path, "sdm", "resume")
    assert (tmp_path / "ckpt").is_dir()  # a distributed checkpoint: one shard file per rank + metadata
    want = run("sdm", world=1)
    for r in ranks:
        assert [h["step"] for h in r["first_history"]] == [2]
        assert r["global_step"] == 6
        assert [h["step"] for h in r["history"]] == [2, 4]
        assert_same_masks(_masks(r["masks"]), _masks(want["masks"]))
        # the second event's statistics: the pre-checkpoint half (rank 0 holds both ranks' sums) + the rest
        assert_same_stats(r["snapshots"][-1]["gradients"], want["snapshots"][-1]["gradients"], "gradients/")
    for k, v in want["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][k], v, rtol=1e-4, atol=1e-6, msg=k)


class _Mesh:
    """What ModelParallelStrategy builds with its defaults on one node of 2 devices: data 1 × tensor 2."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")
    shape = (1, 2)

    def __getitem__(self, name):
        size = dict(zip(self.mesh_dim_names, self.shape))[name]
        return type("Sub", (), {"size": lambda self: size})()


def test_tensor_parallel_default_mesh_is_refused():
    m = module()
    m._device_mesh = _Mesh()
    with pytest.raises(ValueError, match="tensor_parallel_size=2.*HINT: set strategy.init_args.data_parallel_size"):
        m.configure_model()
    m._device_mesh = None
    m.configure_model()  # no mesh (any other strategy): nothing to do
