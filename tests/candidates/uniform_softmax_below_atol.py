# expect: mismatch
# problem: level1/12_Softmax
# every softmax output is below atol=1e-2, so only the norm-relative check can catch this
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def uniform_kernel(out_ptr, n_cols, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    tl.store(out_ptr + row * n_cols + cols, tl.zeros((BLOCK_SIZE,), dtype=tl.float32) + 1.0 / n_cols, mask=mask)


class ModelNew(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        uniform_kernel[(x.shape[0],)](out, x.shape[1], BLOCK_SIZE=triton.next_power_of_2(x.shape[1]))
        return out
