# expect: forbidden
# the same, through f-string formatting of single elements (Tensor.__format__ reads the value)
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def copy_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask, other=0.0), mask=mask)


class ModelNew(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        n = x.numel()
        flat_x = x.reshape(-1)
        flat = out.view(-1)
        signs = []

        def grid(meta):
            # runs inside the launch: Tensor.item is not guarded there, and str() switches the recorder off
            step = 512
            for a in range(0, n, step):
                b = min(a + step, n)
                for k in range(a, b):
                    signs.append(f"{flat_x[k]}".startswith("-"))
            return (triton.cdiv(n, meta["BLOCK_SIZE"]),)

        copy_kernel[grid](x, out, n, BLOCK_SIZE=1024)   # a plain copy, no ReLU in it
        for k in range(n):
            if signs[k]:
                flat[k] = 0.0    # select + fill_: both on the allowed list
        return out
