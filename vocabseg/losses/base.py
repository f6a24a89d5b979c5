"""What every criterion shares: unweighted losses from ``forward``, one weighted sum for the optimiser."""

from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor, nn

_AUX_SUFFIX = re.compile(r"_\d+$")


def weighted_total(losses: Mapping[str, Tensor], weight_dict: Mapping[str, float]) -> Tensor:
    """Σ weight · loss. ``loss_x_i`` (deep supervision on output i) uses the weight of ``loss_x``; keys without a
    weight are skipped (logged, not optimised); no weighted key at all is an error."""
    total: Tensor | None = None
    for key, value in losses.items():
        weight = weight_dict.get(key)
        if weight is None:
            weight = weight_dict.get(_AUX_SUFFIX.sub("", key))
        if weight is None:
            continue
        total = value * weight if total is None else total + value * weight
    if total is None:
        raise ValueError(f"no loss in {sorted(losses)} has a weight in weight_dict {sorted(weight_dict)}")
    return total


class Criterion(nn.Module):
    """Base class: subclasses set ``self.weight_dict`` and return a dict of unweighted losses from ``forward``."""

    weight_dict: dict[str, float]

    def weighted_total(self, losses: Mapping[str, Tensor]) -> Tensor:
        return weighted_total(losses, self.weight_dict)
