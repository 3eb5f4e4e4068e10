"""What to keep: choose layers, heads, KV groups, neurons and channels from importance scores.

A :class:`PrunePlan` lists kept indices (ascending, so kept parts keep their order) and is applied by
:func:`distillery.prune.slicing.apply_plan`. Keeping every index reproduces the teacher exactly.

Grouped-query attention: query head ``h`` reads KV head ``h // g`` (``g = H / KV``). A target of
``A`` heads keeps ``KV'`` whole KV groups (the groups with the largest summed head score) and the
``A / KV'`` best query heads inside each; ``KV'`` is ``kv_heads`` when given, else the largest
count with ``A % KV' == 0``, ``KV' ≤ KV`` and ``A / KV' ≤ g``. So ``A % KV' == 0`` always holds
and every kept query head still reads the KV head it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DistilleryError


@dataclass
class PrunePlan:
    """Kept indices of a pruned student (``L'`` kept layers, all index tensors int64, ascending)."""

    layers: list[int]                      # kept teacher layers, L'
    channels: torch.Tensor                 # (D',) hidden channels
    q_heads: list[torch.Tensor]            # per kept layer: (A,) teacher query heads
    kv_heads: list[torch.Tensor]           # per kept layer: (KV',) teacher KV heads
    neurons: list[torch.Tensor]            # per kept layer: (F',) MLP neurons
    head_dim: int
    scores: dict = field(default_factory=dict)  # what the choice was made from (for the report)

    def summary(self) -> dict:
        """JSON-able description: kept layers, sizes and the depth scores."""
        return {"layers": self.layers, "hidden": int(self.channels.numel()), "heads": int(self.q_heads[0].numel()),
                "kv_heads": int(self.kv_heads[0].numel()), "ffn": int(self.neurons[0].numel()),
                "head_dim": self.head_dim,
                **{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.scores.items()}}


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ascending (ties: the lower index wins)."""
    if k >= scores.numel():
        return torch.arange(scores.numel())
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k].sort().values


def check_target(name: str, value: int | None, teacher: int) -> int:
    """The target size (``value`` or the teacher's); an error names the argument when out of range."""
    if value is None:
        return teacher
    if not isinstance(value, int) or value < 1:
        raise DistilleryError(f"prune: {name} must be a positive integer (got {value!r})")
    if value > teacher:
        raise DistilleryError(f"prune: {name}={value} exceeds the teacher's {teacher}; pruning only removes")
    return value


def kv_group_count(heads: int, n_heads: int, n_kv: int, kv_heads: int | None = None) -> int:
    """Number of KV groups kept for a target of ``heads`` query heads (see module docstring)."""
    g = n_heads // n_kv
    if kv_heads is not None:
        kv = check_target("kv_heads", kv_heads, n_kv)
        if heads % kv or heads // kv > g:
            raise DistilleryError(f"prune: heads={heads} with kv_heads={kv} needs heads to be a multiple of kv_heads "
                                  f"and at most {g} query heads per KV group")
        return kv
    for kv in range(min(n_kv, heads), 0, -1):
        if heads % kv == 0 and heads // kv <= g:
            return kv
    raise DistilleryError(f"prune: heads={heads} cannot keep grouped-query attention valid for a teacher with "
                          f"{n_heads} heads in {n_kv} KV groups of {g}; choose a multiple of {n_kv} or of a "
                          f"divisor of it with at most {g} heads per group")


def choose_heads(head_scores: torch.Tensor, n_kv: int, heads: int, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For one layer's ``head_scores (H,)``: (kept query heads (A,), kept KV heads (KV',)), ascending.

    Query heads are listed group by group, so new head ``j`` reads new KV head ``j // (A / KV')``.
    """
    H = head_scores.numel()
    g = H // n_kv
    per_group = head_scores.view(n_kv, g)                           # (KV, g)
    groups = top_k(per_group.sum(dim=1), kv)                        # (KV',)
    q = [grp * g + top_k(per_group[grp], heads // kv) for grp in groups.tolist()]
    return torch.cat(q), groups


def choose_layers(scores: torch.Tensor, n_layers: int, keep: int, contiguous: bool) -> list[int]:
    """Kept layers. ``scores``: per layer (``contiguous=False``, the ``n - keep`` lowest go) or per
    start of a block of ``n - keep`` layers (``contiguous=True``, the lowest block goes)."""
    drop = n_layers - keep
    if drop == 0:
        return list(range(n_layers))
    if contiguous:
        start = int(torch.argsort(scores.double(), stable=True)[0])
        gone = set(range(start, start + drop))
    else:
        gone = set(torch.argsort(scores.double(), stable=True)[:drop].tolist())
    return [i for i in range(n_layers) if i not in gone]
