"""A trusted kernel the zygote launches once on the Triton interpreter, so no runner pays the first launch."""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask, other=0.0) + 1.0, mask=mask)


def warm_interpreter(scratch: Any) -> None:
    _add_one_kernel[(1,)](scratch, scratch.numel(), BLOCK=triton.next_power_of_2(scratch.numel()))
