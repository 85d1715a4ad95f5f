"""Linear layer, GELU, then multiplication by a constant."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# Sizes are small enough for the CPU interpreter; KRL_PROBLEM_SCALE=8 (or more) sizes them for a GPU.
SCALE = int(os.environ.get("KRL_PROBLEM_SCALE", "1"))


class Model(nn.Module):
    def __init__(self, in_features: int, out_features: int, scale: float):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.linear(x)) * self.scale


batch = 32 * SCALE
in_features = 64 * SCALE
out_features = 96 * SCALE


def get_inputs():
    return [torch.randn(batch, in_features)]


def get_init_inputs():
    return [in_features, out_features, 0.5]
