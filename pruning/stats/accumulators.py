"""The shared machinery of every statistic: named fp32 sums plus a count, reduced over ranks and checkpointed."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import comm_device


class Accumulator:
    """Named fp32 sum tensors plus a count; the shared machinery of every statistic."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def reset(self) -> None:
        for t in self.sums.values():
            t.zero_()
        self.count = 0

    def state_dict(self) -> dict:
        return {"sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["sums"].items():
            if k in self.sums:
                self.sums[k].copy_(v)
            else:
                self.sums[k] = v.clone().float()
        self.count = int(state["count"])

    def reduce(self, group=None) -> None:
        """All-reduce (SUM) sums and counts over data-parallel ranks; a no-op without torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for t in self.sums.values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        self.count = summed_count(self.count, group)

    def merged_state_dict(self, group=None) -> dict:
        """The state one process that saw every rank's samples would hold (sums and count over ranks), on every
        rank, leaving this accumulator as it is. Collective (every rank calls it, in the same order)."""
        state = self.state_dict()
        if not (dist.is_available() and dist.is_initialized()):
            return state
        dev = comm_device(group)
        sums = {}
        for k in sorted(state["sums"]):
            t = state["sums"][k].to(dev, copy=True)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            sums[k] = t.cpu()
        return dict(state, sums=sums, count=summed_count(self.count, group))

    def load_merged_state_dict(self, state: dict, rank: int) -> None:
        """Load :meth:`merged_state_dict` on one of several ranks: rank 0 keeps the sums and the count, the others
        start from zero, so the next :meth:`reduce` counts every sample once."""
        self.load_state_dict(state)
        if rank:
            for t in self.sums.values():
                t.zero_()
            self.count = 0

    def _buf(self, key: str, shape, device) -> torch.Tensor:
        t = self.sums.get(key)
        if t is None:
            t = self.sums[key] = torch.zeros(shape, dtype=torch.float32, device=device)
        elif t.device != torch.device(device):  # restored from a checkpoint onto the host
            t = self.sums[key] = t.to(device)
        return t


def summed_count(count: int, group=None) -> int:
    """``count`` summed over the ranks of ``group`` (collective)."""
    c = torch.tensor([float(count)], dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
    return int(c.item())
