"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), no biases."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# Sizes are small enough for the CPU interpreter; KRL_PROBLEM_SCALE=8 (or more) sizes them for a GPU.
SCALE = int(os.environ.get("KRL_PROBLEM_SCALE", "1"))


class Model(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


tokens = 32 * SCALE
dim = 64 * SCALE
hidden = 96 * SCALE


def get_inputs():
    return [torch.randn(tokens, dim)]


def get_init_inputs():
    return [dim, hidden]
