import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def bf16_matmul_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))


class ModelNew(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
        bf16_matmul_kernel[(1,)](a.contiguous(), b.contiguous(), c, N=a.shape[0])
        return c
