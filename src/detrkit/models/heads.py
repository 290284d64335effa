"""Prediction heads: the class head is an ``nn.Linear``; the box head an :class:`MLP`.

Initialisation helpers for the sigmoid-classified models (prior-probability bias, zero last
box layer) live here so that every transformer part initialises its heads the same way.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "prior_prob_bias", "init_class_head", "zero_init_last_layer"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (none after the last).

    State dict: ``layers.{i}.weight/bias`` (the official layout of ``bbox_embed``).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., input_dim]`` -> ``[..., output_dim]``."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def prior_prob_bias(prior_prob: float = 0.01) -> float:
    """The class-logit bias that makes every sigmoid score start at ``prior_prob``."""
    return -math.log((1 - prior_prob) / prior_prob)


def init_class_head(head: nn.Linear, prior_prob: float = 0.01) -> None:
    """Sigmoid models: set every class bias to :func:`prior_prob_bias` (focal-loss init)."""
    nn.init.constant_(head.bias, prior_prob_bias(prior_prob))


def zero_init_last_layer(mlp: MLP) -> None:
    """Zero the last layer of a box MLP (weights and bias), so initial deltas are 0."""
    nn.init.constant_(mlp.layers[-1].weight, 0.0)
    nn.init.constant_(mlp.layers[-1].bias, 0.0)
