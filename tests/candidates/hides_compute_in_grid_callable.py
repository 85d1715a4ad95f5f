# expect: forbidden
# beneath-gate: forbidden
# the launch grid is a callable; Triton calls it inside the launch, where the dispatch check looks away,
# and it computes the answer with torch while the kernel writes a scratch buffer
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


class ModelNew(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        scratch = torch.empty_like(x)
        n = x.numel()

        def grid(meta):
            out.copy_(x * (x > 0))
            return (triton.cdiv(n, meta["BLOCK_SIZE"]),)

        relu_kernel[grid](x, scratch, n, BLOCK_SIZE=1024)
        return out
