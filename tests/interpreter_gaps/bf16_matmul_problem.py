import torch
import torch.nn as nn


class Model(nn.Module):
    """bf16 inputs, fp32 product (computed in fp32: bf16 arithmetic is not safe on every CPU)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a.float(), b.float())


def get_inputs():
    return [torch.randn(32, 32).to(torch.bfloat16), torch.randn(32, 32).to(torch.bfloat16)]


def get_init_inputs():
    return []
