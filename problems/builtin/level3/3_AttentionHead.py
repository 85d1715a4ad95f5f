"""Single-head scaled dot-product attention softmax(Q K^T / sqrt(d)) V over a batch."""

import os

import torch
import torch.nn as nn

# Sizes are small enough for the CPU interpreter; KRL_PROBLEM_SCALE=8 (or more) sizes them for a GPU.
SCALE = int(os.environ.get("KRL_PROBLEM_SCALE", "1"))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        pass

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
        return torch.matmul(torch.softmax(scores, dim=-1), v)


batch = 2
seq = 32 * SCALE
head_dim = 32


def get_inputs():
    return [torch.randn(batch, seq, head_dim), torch.randn(batch, seq, head_dim), torch.randn(batch, seq, head_dim)]


def get_init_inputs():
    return []
