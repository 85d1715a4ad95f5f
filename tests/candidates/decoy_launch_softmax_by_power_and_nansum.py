# expect: forbidden
# beneath-gate: forbidden
# problem: level1/12_Softmax
# a real softmax kernel runs on a scratch buffer; the returned softmax is math.e ** x and nansum (not on the gate's list)
import math

import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def softmax_kernel(x_ptr, out_ptr, n_cols, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=-float("inf"))
    x = x - tl.max(x, axis=0)
    e = tl.exp(x)
    tl.store(out_ptr + row * n_cols + cols, e / tl.sum(e, axis=0), mask=mask)


class ModelNew(nn.Module):
    def forward(self, x):
        scratch = torch.empty_like(x)
        softmax_kernel[(x.shape[0],)](x, scratch, x.shape[1], BLOCK_SIZE=triton.next_power_of_2(x.shape[1]))
        e = math.e ** x
        return e / e.nansum(dim=1, keepdim=True)
