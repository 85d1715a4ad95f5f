# expect: forbidden
# holds torch.cuda in a variable and reaches importlib through it to switch the runner's recorder off
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def copy_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask, other=0.0), mask=mask)


class Everything:
    def __contains__(self, name):   # dunder method definitions are not gated
        return True


class ModelNew(nn.Module):
    def forward(self, x):
        cuda = torch.cuda      # an allowed name, and a module: through it, every module torch.cuda imported
        pipeline = cuda.importlib.import_module("kernelrl.actors.eval_pipeline")
        pipeline.ALLOWED_ATEN_OPS = Everything()    # the op recorder now allows every aten op
        scratch = torch.empty_like(x)
        copy_kernel[(triton.cdiv(x.numel(), 1024),)](x, scratch, x.numel(), BLOCK_SIZE=1024)
        return x * (x > 0)   # plain torch compute, now unrecorded
