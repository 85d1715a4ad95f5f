# expect: forbidden
# beneath-gate: forbidden
# relu(x) = (x + |x|) / 2 with |x| as the square root of x*x: arithmetic operators only
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def relu_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, tl.maximum(x, 0.0), mask=mask)


def launch_relu(x, out):
    relu_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK_SIZE=1024)


class ModelNew(nn.Module):
    def forward(self, x):
        warm = torch.empty_like(x)
        launch_relu(x, warm)
        return (x + (x * x) ** 0.5) * 0.5
