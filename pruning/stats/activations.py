"""Statistics of a Linear's input per input feature: Σx², Σx, the Gram matrix, a seeded subsample of token rows."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import comm_device
from .accumulators import Accumulator
from .routing import routing_sums

ACT_STATS = ("sum_sq", "gram", "samples", "routing")


class ActivationStats(Accumulator):
    """Statistics of one Linear's input per input feature: Σx² (and Σx when ``with_mean``), over tokens.

    ``compute()`` returns ``sum_sq`` (Σ_t x², Wanda's squared column norm ‖X_j‖²), ``count`` (tokens) and, with
    ``with_mean``, the per-feature ``mean`` and ``var``.

    ``kinds`` adds statistics some criteria need (``sum_sq`` is always kept):

    - ``gram``: ``Σ_t x_t x_tᵀ`` ([in, in], fp32), the Gram matrix SparseGPT's Hessian ``H = 2XXᵀ`` is made of;
      a sum like the others, so ``reduce`` and checkpoints treat it the same way;
    - ``samples``: a seeded uniform subsample of ``samples`` token rows ([m, in], see :class:`ActivationSamples`),
      the per-sample activations the mutual-information criterion compares;
    - ``routing``: at a mixture-of-experts' experts module, the per-expert sums of :func:`~.routing.routing_sums`
      (``routed``, ``gate``, ``reap``) that expert criteria read.
    """

    def __init__(
        self, with_mean: bool = False, kinds: Iterable[str] = ("sum_sq",), samples: int = 256, seed: int = 0
    ) -> None:
        super().__init__()
        self.with_mean = with_mean
        self.kinds = tuple(dict.fromkeys(("sum_sq", *kinds)))
        bad = set(self.kinds) - set(ACT_STATS)
        if bad:
            raise ValueError(f"activation statistics {sorted(bad)} unknown; choose from {ACT_STATS}")
        self.reservoir = ActivationSamples(samples, seed) if "samples" in self.kinds else None
        self._routing = False  # inside update_routing (its own calls of the experts module are not counted)

    @property
    def squares_only(self) -> bool:
        """Σx² is all it keeps: :func:`token_squares` of an input can be shared with other Linears reading it."""
        return self.kinds == ("sum_sq",) and not self.with_mean

    def add_squares(self, squares: torch.Tensor, tokens: int) -> None:
        """Add :func:`token_squares` of an input (:attr:`squares_only` statistics)."""
        self._buf("sum_sq", squares.shape[-1], squares.device).add_(squares)
        self.count += tokens

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``x``: [..., in_features]; ``mask`` (optional, [...]): which tokens count (padding excluded)."""
        x = tokens_of(x, mask)
        self._buf("sum_sq", x.shape[-1], x.device).add_(x.square().sum(0))
        if self.with_mean:
            self._buf("sum", x.shape[-1], x.device).add_(x.sum(0))
        if "gram" in self.kinds:
            self._buf("gram", (x.shape[-1], x.shape[-1]), x.device).addmm_(x.T, x)
        if self.reservoir is not None:
            self.reservoir.update(x)
        self.count += x.shape[0]

    def update_routing(self, experts: nn.Module, args: tuple, mask: torch.Tensor | None = None) -> None:
        """The routing sums of one batch at an experts module (``args``: its forward's ``(hidden, top-k indices,
        top-k weights)``); the module is called again inside, so this is a no-op while it runs."""
        if self._routing:
            return
        self._routing = True
        try:
            for name, v in routing_sums(experts, *args[:3], mask).items():
                self._buf(name, v.shape, v.device).add_(v)
        finally:
            self._routing = False

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"sum_sq": self.sums["sum_sq"], "count": torch.tensor(self.count)}
        out.update({k: self.sums[k] for k in ("routed", "gate", "reap") if k in self.sums})
        if self.with_mean and self.count:
            mean = self.sums["sum"] / self.count
            out["mean"] = mean
            out["var"] = (self.sums["sum_sq"] / self.count - mean * mean).clamp_min(0)
        if "gram" in self.sums:
            out["gram"] = self.sums["gram"]
        if self.reservoir is not None:
            out["samples"] = self.reservoir.compute()
        return out

    def sample_rows(self) -> torch.Tensor:
        """The subsampled token rows [m, in] (``kinds`` must include ``samples``)."""
        if self.reservoir is None:
            raise KeyError("no per-sample activations: build the statistics with kinds=('samples',)")
        return self.reservoir.compute()

    def reset(self) -> None:
        super().reset()
        if self.reservoir is not None:
            self.reservoir.reset()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.reservoir is not None:
            state["samples"] = self.reservoir.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.reservoir is not None and "samples" in state:
            self.reservoir.load_state_dict(state["samples"])

    def reduce(self, group=None) -> None:
        super().reduce(group)
        if self.reservoir is not None:
            self.reservoir.reduce(group)

    def load_merged_state_dict(self, state: dict, rank: int) -> None:
        super().load_merged_state_dict(state, rank)
        if rank and self.reservoir is not None:  # rank 0 keeps the saved rows: the others' would repeat them
            self.reservoir.reset()


def tokens_of(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ([..., in_features]) as fp32 token rows, those where ``mask`` is 0 (padding) left out."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x if mask is None else x[mask.reshape(-1).to(x.device).bool()]


@torch.no_grad()
def token_squares(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(Σ_tokens x², tokens)`` of an input, as :meth:`ActivationStats.update` adds them."""
    x = tokens_of(x, mask)
    return x.square().sum(0), x.shape[0]


class ActivationSamples:
    """A uniform random subsample, without replacement, of ``size`` of the rows (tokens) seen, reproducible by seed.

    Every row gets a random key from a seeded generator and the ``size`` rows with the smallest keys are kept
    (bottom-k sampling): a uniform subset of everything seen, in O(size) memory, whatever the number of batches.
    Two statistics built with the same seed and fed the same token stream keep the same token positions, so the
    layers of one model are compared on the same tokens. ``reduce()`` all-gathers the ranks' rows and keys and keeps
    the ``size`` smallest keys (each rank draws its keys from ``seed`` and its rank), i.e. a uniform subsample of
    all ranks' rows. Not a sum, so not an :class:`Accumulator`, but the same verbs.
    """

    def __init__(self, size: int = 256, seed: int = 0) -> None:
        if size < 2:
            raise ValueError(f"samples={size} must be >= 2")
        self.size = size
        self.seed = seed
        self.rows: torch.Tensor | None = None  # [size, d] fp32, sorted by key; unfilled slots have key +inf
        self.keys: torch.Tensor | None = None  # [size] fp64
        self.seen = 0
        self._gen: torch.Generator | None = None

    def _generator(self) -> torch.Generator:
        if self._gen is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._gen = torch.Generator().manual_seed(self.seed + 1_000_003 * rank)
        return self._gen

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        keys = torch.rand(x.shape[0], generator=self._generator(), dtype=torch.float64).to(x.device)
        if self.rows is None:
            self.rows = torch.zeros(self.size, x.shape[-1], dtype=torch.float32, device=x.device)
            self.keys = torch.full((self.size,), float("inf"), dtype=torch.float64, device=x.device)
        self.seen += x.shape[0]
        # only the new rows among the batch's own bottom-k can enter the kept set
        k = min(self.size, x.shape[0])
        new_keys, idx = torch.topk(keys, k, largest=False)
        self._merge(new_keys, x[idx])

    def _merge(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        all_keys = torch.cat([self.keys, keys.to(self.keys.device)])
        all_rows = torch.cat([self.rows, rows.to(self.rows.device)])
        best, idx = torch.topk(all_keys, self.size, largest=False)  # sorted ascending
        self.keys, self.rows = best, all_rows[idx]

    def compute(self) -> torch.Tensor:
        """The kept rows, [min(size, seen), d]."""
        if self.rows is None:
            raise RuntimeError("no activations were recorded")
        return self.rows[torch.isfinite(self.keys)]

    def reset(self) -> None:
        self.rows = self.keys = None
        self.seen = 0
        self._gen = None

    def state_dict(self) -> dict:
        return {
            "rows": None if self.rows is None else self.rows.detach().cpu().clone(),
            "keys": None if self.keys is None else self.keys.detach().cpu().clone(),
            "seen": self.seen,
            "generator": None if self._gen is None else self._gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        dev = self.rows.device if self.rows is not None else torch.device("cpu")
        self.rows = None if state["rows"] is None else state["rows"].to(dev)
        self.keys = None if state["keys"] is None else state["keys"].to(dev)
        self.seen = int(state["seen"])
        self._gen = None
        if state.get("generator") is not None:
            self._gen = torch.Generator()
            self._gen.set_state(state["generator"])

    def reduce(self, group=None) -> None:
        """All-gather the ranks' rows and keys, keep the ``size`` smallest keys; a no-op without torch.distributed.

        Collective for every rank, also one that holds fewer rows or none (it saw fewer tokens, or restarted from a
        checkpoint that rank 0 keeps): row counts and widths are exchanged first and the rows padded to the longest
        (padding keys are +inf, never kept)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        dev = comm_device(group)
        n = 0 if self.rows is None else int(self.rows.shape[0])
        width = 0 if self.rows is None else int(self.rows.shape[1])
        meta = torch.tensor([n, width], dtype=torch.int64, device=dev)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        n_max, width = max(int(m[0]) for m in metas), max(int(m[1]) for m in metas)
        seen = torch.tensor([float(self.seen)], dtype=torch.float64, device=dev)
        dist.all_reduce(seen, op=dist.ReduceOp.SUM, group=group)
        self.seen = int(seen.item())
        if n_max == 0:
            return
        home = self.rows.device if self.rows is not None else torch.device("cpu")
        dtype = self.rows.dtype if self.rows is not None else torch.float32
        my_keys = torch.full((n_max,), float("inf"), dtype=torch.float64, device=dev)
        my_rows = torch.zeros((n_max, width), dtype=torch.float32, device=dev)
        if n:
            my_keys[:n] = self.keys.to(dev, torch.float64)
            my_rows[:n] = self.rows.to(dev, torch.float32)
        keys = [torch.empty_like(my_keys) for _ in range(world)]
        rows = [torch.empty_like(my_rows) for _ in range(world)]
        dist.all_gather(keys, my_keys, group=group)
        dist.all_gather(rows, my_rows, group=group)
        all_keys, all_rows = torch.cat(keys), torch.cat(rows)
        best, idx = torch.topk(all_keys, min(self.size, all_keys.numel()), largest=False)  # +inf: empty slots
        key_dtype = self.keys.dtype if self.keys is not None else torch.float64
        self.keys, self.rows = best.to(home, key_dtype), all_rows[idx].to(home, dtype)
