"""GELU activation (exact, erf form)."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# Sizes are small enough for the CPU interpreter; KRL_PROBLEM_SCALE=8 (or more) sizes them for a GPU.
SCALE = int(os.environ.get("KRL_PROBLEM_SCALE", "1"))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


batch_size = 16
dim = 1024 * SCALE


def get_inputs():
    return [torch.randn(batch_size, dim)]


def get_init_inputs():
    return []
