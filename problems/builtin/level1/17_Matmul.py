"""Matrix multiplication C = A @ B."""

import os

import torch
import torch.nn as nn

# Sizes are small enough for the CPU interpreter; KRL_PROBLEM_SCALE=8 (or more) sizes them for a GPU.
SCALE = int(os.environ.get("KRL_PROBLEM_SCALE", "1"))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        pass

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


M = 64 * SCALE
K = 96 * SCALE
N = 80 * SCALE


def get_inputs():
    return [torch.randn(M, K), torch.randn(K, N)]


def get_init_inputs():
    return []
