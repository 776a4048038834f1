"""Per-sequence gradients of Linear layers from one batched backward, folded into the statistics as they are made.

For a Linear ``y = x Wᵀ + b`` the gradient of sequence ``n``'s loss is ``g_n = Σ_t δ_nt x_ntᵀ`` for the weight and
``Σ_t δ_nt`` for the bias, with ``δ`` the gradient of the output and ``x`` the input: the layer's backward sees both
for the whole batch (the technique of per-sample-gradient libraries). :class:`SequenceGradients` puts a custom
autograd function in place of the ``forward`` of every Linear whose statistics are wanted. Its backward computes the
input's gradient as autograd does, then the per-sequence gradients a chunk of sequences at a time (at most
``chunk_elements`` values at once, at least one sequence), adds each sequence's terms into the statistics and drops
them, and returns the weight's gradient (their sum) only when the caller trains on it (``weight_grads``; zeros
otherwise). The per-sequence products *replace* the batched weight gradient instead of adding to it, so a batch
costs about one plain backward.

- Element statistics (Σg², Σ|g|, Σ|g⊙w|) are folded in sequence by sequence as each layer's gradient arrives;
  group statistics keep per-sequence partial sums until the group set's last member arrives, in the same backward
  (:mod:`.grouped`): ``[sequences, groups]`` for ``vector``, ``[sequences, groups, hidden]`` for SDMPrune's
  ``coupled`` sum over gate, up and down before the absolute value (the size of one member per sequence, for one
  decoder layer at a time).
- A statistic of ``sum`` alone (Taylor) needs ``Σ_n g_n`` only: one matrix product for the batch.

"A sequence" is one row of the batch (OPT's MLP sees the rows flattened: :meth:`SequenceGradients.begin_batch` says
how many). Its gradient is that of its *own* loss: a loss averaged over a batch's tokens gives each sequence a share,
which ``scales`` multiplies back (:func:`token_mean_scales`); positions where ``token_mask`` is 0 (padding) add
nothing. Only weights and biases of plain ``nn.Linear`` modules of their own can be served (:func:`unsupported`
says why not); the others need one backward per sequence.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..options import IGNORE_INDEX
from .gradients import GradientStats, GroupGradientStats
from .grouped import GroupPlan, OpenGroup, Role, bias_sequences, fold_bias, sequence_products

CHUNK_ELEMENTS = 1 << 24  # per-sequence gradient values made at once (64 MiB in fp32); at least one sequence


def token_mean_scales(labels: torch.Tensor) -> list[float]:
    """Per-sequence factors that turn the gradient of a loss averaged over a batch's next-token positions with label
    ≠ −100 (Hugging Face's causal-LM loss, :func:`pruning.losses.distillation_loss`) into each sequence's gradient of
    its own mean loss: ``N / n_s`` (``n_s`` the sequence's positions, ``N`` the batch's), 0 for a sequence without
    any (its gradient is 0 either way). ``labels``: ``[sequences, positions]`` (``[positions]``: one sequence)."""
    labels = labels if labels.dim() == 2 else labels.reshape(1, -1)
    valid = (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
    total = float(sum(valid))
    return [total / n if n else 0.0 for n in valid]


def unsupported(model: nn.Module, names: Iterable[str], group_members: Iterable[Iterable[str]] = ()) -> dict[str, str]:
    """The parameters among ``names`` (and the members of the group sets ``group_members``) whose per-sequence
    gradients a batched backward cannot give here, each with the reason; every other one is the weight or bias of a
    plain ``nn.Linear`` that no other module shares, and a member of at most one group set."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    bad: dict[str, str] = {}
    owners: Counter = Counter()
    sets = [list(m) for m in group_members]
    for members in sets:
        owners.update({n.rpartition(".")[0] for n in members})
    for name in [*names, *(n for members in sets for n in members)]:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            bad[name] = f"{owner} is a {type(module).__name__}, not a plain nn.Linear"
        elif attr not in ("weight", "bias"):
            bad[name] = f"{attr} is not a Linear's weight or bias"
        elif uses[id(getattr(module, attr))] > 1:
            bad[name] = "the parameter is shared with another module (tied)"
        elif owners[owner] > 1:
            bad[name] = f"{owner} is a member of several group sets"
    return bad


@dataclass
class SequenceBatch:
    """What the per-sequence products know of the batch in flight (see :meth:`SequenceGradients.begin_batch`)."""

    sequences: int | None = None
    token_mask: torch.Tensor | None = None  # [sequences, positions]; 0 = padding; None: every position counts
    scales: list[float] | None = None  # one per sequence (see token_mean_scales); None: 1 each
    grad_scale: float = 1.0  # on every sequence (a trainer's division of the loss undone)

    def factors(self, n: int) -> list[float]:
        """The factor of each of the ``n`` sequences of a layer's gradient."""
        if self.scales is None:
            return [self.grad_scale] * n
        if len(self.scales) != n:
            raise RuntimeError(
                f"a Linear saw {n} sequences but the batch was announced with {len(self.scales)} scales. HINT: "
                "call begin_batch with the rows of the batch the model is run on"
            )
        return [s * self.grad_scale for s in self.scales]

    def split(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Input and output gradient as ``[sequences, positions, features]``, the input zeroed at padding, and the
        mask ``[sequences, positions, 1]`` (``None``: no padding)."""
        if x.dim() >= 3:
            n = x.shape[0]
        elif self.sequences and x.shape[0] % self.sequences == 0:
            n = self.sequences  # the rows flattened into tokens (OPT's MLP)
        else:
            raise RuntimeError(
                f"a Linear got a 2-D input {tuple(x.shape)} and the batch has {self.sequences} sequences. HINT: call "
                "begin_batch(sequences) with the rows of the batch before its forward"
            )
        x3, d3 = x.reshape(n, -1, x.shape[-1]), d.reshape(n, -1, d.shape[-1])
        if self.token_mask is None:
            return x3, d3, None
        if self.token_mask.numel() != x3.shape[0] * x3.shape[1]:
            raise RuntimeError(f"token_mask {tuple(self.token_mask.shape)} does not match an input {tuple(x.shape)}")
        m3 = self.token_mask.reshape(n, -1, 1).to(device=x.device, dtype=x.dtype)
        return x3 * m3, d3, m3


@dataclass
class _Site:
    """One Linear whose parameters' per-sequence gradients feed statistics."""

    name: str
    element: dict[str, GradientStats] = field(default_factory=dict)  # "weight" / "bias" -> its statistics
    group: GroupPlan | None = None
    module: nn.Linear | None = None

    @property
    def sums_only(self) -> bool:
        return self.group is None and all(set(s.kinds) == {"sum"} for s in self.element.values())


class SequenceGradients:
    """Per-sequence gradient statistics of Linear layers from batched backwards (see the module docstring).

    ``element``: parameter name -> its :class:`GradientStats`; ``groups``: the :class:`GroupGradientStats` of group
    sets whose members are all Linear parameters. :meth:`attach` swaps the Linears' ``forward``; around each
    micro-batch call :meth:`begin_batch` (before its forward) and :meth:`end_batch` (after its backward).
    ``weight_grads``: return the weights' gradients to autograd (``False``: nobody trains on them, e.g. one-shot
    scoring or frozen weights: zeros, and the per-sequence products are all that is made)."""

    def __init__(
        self,
        model: nn.Module,
        element: dict[str, GradientStats],
        groups: Iterable[GroupGradientStats] = (),
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        groups = list(groups)
        bad = unsupported(model, element, [[m.name for m in g.group_set.members] for g in groups])
        if bad:
            name, why = next(iter(bad.items()))
            raise ValueError(
                f"per-sequence gradients of {sorted(bad)[:3]} cannot come from a batched backward ({name}: {why})."
                " HINT: collect them with one backward per sequence (batched=False)"
            )
        self.model = model
        self.chunk_elements = chunk_elements
        self.batch = SequenceBatch()
        self.weight_grads = True
        self.sites: dict[str, _Site] = {}
        for name, stat in element.items():
            owner, _, attr = name.rpartition(".")
            self.sites.setdefault(owner, _Site(owner)).element[attr] = stat
        for stats in groups:
            plan = GroupPlan(stats)
            for owner in plan.roles:
                self.sites.setdefault(owner, _Site(owner)).group = plan
        self._open: dict[str, OpenGroup] = {}
        self._swapped: list[nn.Module] = []

    # ------------------------------------------------------------------ set-up and the batch
    def attach(self) -> SequenceGradients:
        """Put the per-sequence function in place of each Linear's ``forward`` (forwards without autograd are
        plain ``F.linear``)."""
        self.detach()
        for name, site in self.sites.items():
            site.module = self.model.get_submodule(name)  # type: ignore[assignment]
            site.module.forward = functools.partial(_forward, self, site)  # type: ignore[method-assign]
            self._swapped.append(site.module)
        return self

    def detach(self) -> None:
        for module in self._swapped:
            module.__dict__.pop("forward", None)
        self._swapped = []
        self._open = {}

    def begin_batch(
        self, sequences: int, token_mask: torch.Tensor | None = None, scales: Iterable[float] | None = None
    ) -> None:
        """The next forward holds ``sequences`` rows; ``token_mask`` ``[sequences, positions]`` (0: padding) and
        per-sequence ``scales`` (:func:`token_mean_scales`) if the loss is averaged over the batch."""
        self._open = {}
        mask = None if token_mask is None or bool(token_mask.bool().all()) else token_mask
        self.batch.sequences, self.batch.token_mask = sequences, mask
        self.batch.scales = None if scales is None else [float(s) for s in scales]

    def end_batch(self) -> None:
        """Close the batch: group sets with members that got no gradient are summed over those that did."""
        for group in list(self._open.values()):
            self._finish(group)
        self._open = {}

    # ------------------------------------------------------------------ one Linear's backward
    def backward(
        self, site: _Site, x: torch.Tensor, d: torch.Tensor, params: tuple, need_w: bool, need_b: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Fold the layer's per-sequence gradients into the statistics; the weight's and bias's gradients for
        autograd (the weight's are zeros unless ``weight_grads``)."""
        x3, d3, m3 = self.batch.split(x, d)
        w, b = (None if p is None else p.detach() for p in params)
        train = need_w and self.weight_grads
        if site.sums_only:
            gw = self._fold_sum(site, x3, d3, m3, w, b)
        else:
            gw = self._fold(site, x3, d3, m3, w, b, total=train and m3 is None)
        if train and (gw is None or m3 is not None):  # padding: the weight's own gradient as autograd makes it
            gw = _weight_grad(x, d)
        elif need_w and not train:  # zeros, not None: a tensor hook on the weight (mask holding) gets one
            gw = torch.zeros_like(w)
        gb = d.reshape(-1, d.shape[-1]).sum(0) if need_b else None  # as autograd: a sum, no product to spare
        return gw if need_w else None, gb

    def _open_group(self, plan: GroupPlan, n: int, device: torch.device) -> OpenGroup:
        group = self._open.get(plan.key)
        if group is None:
            group = self._open[plan.key] = OpenGroup(plan, n, device)
        return group

    def _finish(self, group: OpenGroup) -> None:
        """The group set's sums over the batch into its statistics."""
        group.finish(self.batch.factors(group.sequences))
        self._open.pop(group.plan.key, None)

    @torch.no_grad()
    def _fold_sum(self, site: _Site, x3, d3, m3, w, b) -> torch.Tensor:
        """``Σ_n factor_n g_n`` (one product for the batch) into a ``sum``-only statistic; returns ``Σ_n g_n``."""
        n = x3.shape[0]
        f = self.batch.factors(n)
        flat_x = x3.reshape(-1, x3.shape[-1])
        total = d3.reshape(-1, d3.shape[-1]).t().mm(flat_x)
        weighted, alpha = total, f[0]
        if any(v != f[0] for v in f):  # sequences of different lengths: weight each one's share
            s = torch.tensor(f, dtype=d3.dtype, device=d3.device)[:, None, None]
            weighted, alpha = (d3 * s).reshape(-1, d3.shape[-1]).t().mm(flat_x), 1.0
        stat = site.element.get("weight")
        if stat is not None:
            dest = stat.open_batch(w.shape, w.device)
            stat.add_sequence(dest, weighted, w, alpha)
            stat.close_batch(dest, n)
        if "bias" in site.element:
            fold_bias(site.element["bias"], bias_sequences(d3, m3), b, f)
        return total

    @torch.no_grad()
    def _fold(self, site: _Site, x3, d3, m3, w, b, total: bool) -> torch.Tensor | None:
        """Per-sequence gradients of one Linear, a chunk of sequences at a time, into its element statistics and
        its group set's partial sums; returns ``Σ_n g_n`` when ``total``."""
        n, plan = x3.shape[0], site.group
        f = self.batch.factors(n)
        role = plan.roles[site.name] if plan is not None else Role()
        group = self._open_group(plan, n, x3.device) if plan is not None else None
        transposed = plan is not None and plan.transposed(site.name)
        wl = (w.t() if transposed else w).float().contiguous() if role.weights else None
        stat = site.element.get("weight")
        dest = stat.open_batch(w.shape, w.device) if stat is not None else None
        acc = None
        for lo, g in _chunks(x3, d3, self.chunk_elements, transposed):
            if total:
                acc = g.sum(0) if acc is None else acc.add_(g.sum(0))
            if dest is not None:
                stat.add_sequences(dest, g.transpose(1, 2) if transposed else g, w, f[lo : lo + len(g)])
            if wl is not None:
                group.add_weight(lo, g.mul_(wl), role)
        if dest is not None:
            stat.close_batch(dest, n)
        if b is not None and ("bias" in site.element or role.biases):
            gb = bias_sequences(d3, m3)
            fold_bias(site.element.get("bias"), gb, b, f)
            if group is not None:
                group.add_bias(gb, b, role)
        if group is not None:
            group.arrived.add(site.name)
            if group.complete:
                self._finish(group)
        return None if acc is None else acc.t().contiguous() if transposed else acc


def _chunks(
    x3: torch.Tensor, d3: torch.Tensor, budget: int, transposed: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first sequence, per-sequence gradients)`` of at most ``budget`` values (at least one sequence) at a time."""
    n = x3.shape[0]
    step = max(1, min(n, budget // (x3.shape[-1] * d3.shape[-1])))
    for lo in range(0, n, step):
        yield lo, sequence_products(x3[lo : lo + step], d3[lo : lo + step], transposed)


def _weight_grad(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The batch's weight gradient, as autograd computes it (one product over every token)."""
    return d.reshape(-1, d.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------- the function
class _SequenceLinear(torch.autograd.Function):
    """``F.linear`` whose backward also folds the per-sequence gradients into the statistics (see the module)."""

    @staticmethod
    def forward(ctx, x, weight, bias, engine, site, params):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.engine, ctx.site, ctx.params, ctx.has_bias = engine, site, params, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad.matmul(weight) if need_x else None
        gw, gb = ctx.engine.backward(ctx.site, x, grad, ctx.params, need_w, need_b and ctx.has_bias)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(weight.dtype)
        return grad_x, gw, gb, None, None, None


def _forward(engine: SequenceGradients, site: _Site, x: torch.Tensor) -> torch.Tensor:
    """A Linear's forward while attached. Under autocast the casts autocast would make (inputs to its lower
    precision), then the function with autocast off; the statistics read the parameters themselves."""
    module = site.module
    w, b = module.weight, module.bias
    if not torch.is_grad_enabled():
        return F.linear(x, w, b)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            bias = None if b is None else b.to(dt)
            return _SequenceLinear.apply(x.to(dt), w.to(dt), bias, engine, site, (w, b))
    return _SequenceLinear.apply(x, w, b, engine, site, (w, b))
