# expect: forbidden
# beneath-gate: shape
# returns a list subclass whose __iter__ computes torch ReLU once forward has returned, where no check looked
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def copy_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask, other=0.0), mask=mask)


class Later(list):
    # list(out) and pack_values iterate the result after forward returned: outside the op recorder,
    # outside the sandbox and (on a GPU) after the end event
    def __iter__(self):
        x = self.pop()
        self.append(x)
        return iter([x.clamp(min=0)])


class ModelNew(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        n = x.numel()
        copy_kernel[(triton.cdiv(n, 1024),)](x, out, n, BLOCK_SIZE=1024)   # a plain copy, no ReLU in it
        return Later([x])
