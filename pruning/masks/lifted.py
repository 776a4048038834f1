"""The original values of pruned weights, stashed, and the masks lifted for the distillation teacher.

``MaskSet.apply(model, keep_original=True)`` stashes the values it zeroes; :meth:`Originals.lifted` brings them back
for a block (the frozen teacher of self-distillation is the same parameters with the masks lifted, so no second copy
of the model is held on the device). The stash keeps each mask as its compact factors (a group keep-vector costs
O(groups)) and the values as the pruned entries only, on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..distributed import is_dtensor, local, local_rows
from ..structure import named_parameters
from .routing import experts_lifted
from .storage import KeepMasks


def _product(factors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The full keep mask from broadcastable factors, on ``like``'s device (``like``'s global shape if sharded)."""
    mask = torch.ones(like.shape, dtype=torch.bool, device=like.device)
    for f in factors:
        mask &= f.to(like.device)
    return mask


class Originals(KeepMasks):
    """Keep masks plus the stash of the original values of the weights they pruned."""

    def __init__(self) -> None:
        super().__init__()
        self._stash: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}  # name -> (mask factors, pruned values)

    @torch.no_grad()
    def _stash_original(self, name: str, p: torch.Tensor) -> None:
        """Stash the values of ``p`` that the current masks prune (before they are zeroed); values stashed for
        earlier masks are put back first, so the stash always holds the original weights."""
        full = p.full_tensor() if is_dtensor(p) else p.detach().clone()
        if name in self._stash:
            old_factors, old_vals = self._stash[name]
            full[~_product(old_factors, full)] = old_vals.to(full.device, full.dtype)
        # the mask is kept as its compact factors (a group keep-vector costs O(groups)), the values as the
        # pruned entries only, on the host: the stash is the pruned fraction of the weights, no more
        fs = self.factors(name, p)
        self._stash[name] = ([f.cpu() for f in fs], full[~_product(fs, full)].cpu())

    @contextmanager
    def lifted(self, model: nn.Module) -> Iterator[None]:
        """Temporarily restore the original values of pruned weights (those stashed by ``apply(keep_original=True)``).

        The frozen teacher of self-distillation is then the same parameters with the masks lifted: no second copy
        of the model is held on the device, only the pruned values are brought back for the teacher's forward.
        """
        params = named_parameters(model)
        with torch.no_grad():
            for name, (factors, vals) in self._stash.items():
                p = params[name]
                pruned = ~_product(factors, p)
                if is_dtensor(p):  # the stash is in row-major order: this rank's rows are one contiguous slice
                    first, rows = local_rows(p)
                    start = int(pruned[:first].sum())
                    pruned = pruned[first : first + rows]
                    vals = vals[start : start + int(pruned.sum())]
                lp = local(p)
                lp[pruned.to(lp.device)] = vals.to(lp.device, lp.dtype)
        try:
            with experts_lifted(model):  # the routers choose among every expert again (the original model)
                yield
        finally:
            with torch.no_grad():
                for name in self._stash:
                    p = params[name]
                    for f in self._local_factors(name, p):
                        local(p).mul_(f)

    @property
    def has_original(self) -> bool:
        return bool(self._stash)

    def stash_bytes(self) -> int:
        """Host memory the stash of original values holds (the pruned values and their compact mask factors)."""
        return sum(
            vals.numel() * vals.element_size() + sum(f.numel() * f.element_size() for f in factors)
            for factors, vals in self._stash.values()
        )

    def state_dict(self, with_original: bool = False) -> dict:
        """Masks and group definitions; ``with_original`` adds the stashed original values of pruned weights (what
        the lifted teacher needs after a resume: the checkpointed weights are already zero there)."""
        out = super().state_dict()
        if with_original and self._stash:
            out["original"] = {k: ([f.clone() for f in fs], vals.clone()) for k, (fs, vals) in self._stash.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        if "original" in state:
            self._stash = {k: ([f.to(torch.bool) for f in fs], vals) for k, (fs, vals) in state["original"].items()}
        super().load_state_dict(state)
