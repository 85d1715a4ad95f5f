# expect: forbidden
# beneath-gate: forbidden
# the kernel body calls a plain Python helper; on the CPU interpreter it runs inside the launch, where the
# dispatch check looks away, and computes the answer with torch operators on tensors staged at module level
import torch
import torch.nn as nn
import triton
import triton.language as tl

_staged = {}


def _finish():
    _staged["out"].copy_(_staged["x"] * (_staged["x"] > 0))


@triton.jit
def relu_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, x, mask=mask)
    _finish()


class ModelNew(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        scratch = torch.empty_like(x)
        _staged["x"] = x
        _staged["out"] = out
        relu_kernel[(triton.cdiv(x.numel(), 1024),)](x, scratch, x.numel(), BLOCK_SIZE=1024)
        return out
