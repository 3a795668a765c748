"""Products of a few rows with a large weight, spread over torch's CPU threads.

A decoding step multiplies one row per sequence by every weight of the model (projections, MLPs,
the LM head): at batch 1 SmolLM2-135M reads ~540 MB of float32 weights per token. torch's CPU
product for so few rows runs on one thread whatever ``torch.set_num_threads`` says (measured on 2
cores: the 49152 x 576 LM head times one row, 7.1 ms with 1 thread and 7.0 ms with 2; with 2 to 8
rows no faster), so a second core gave decoding nothing. Cut by output columns into one block per
thread, the same product is one batched matmul, which torch spreads over its threads: 3.6 ms with
2 threads (1.8-1.9x for 1 to 8 rows; 1.3-1.4x for a 1536 x 576 MLP weight warm in cache). Each
output is the same dot product over the same inputs (equal to ``F.linear`` within float rounding:
the kernel's own sum order). Inference only: with autograd on, or on another device,
``F.linear`` as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 8
"""Most rows split (decoding steps of up to 8 sequences); longer inputs thread well already."""
MIN_BLOCK = 128
"""Fewest output columns per block: smaller blocks cost more in the split than they gain."""


def row_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; an input of at most :data:`MAX_ROWS` rows on CPU, without
    autograd, is computed as one block of output columns per torch thread.

    Args:
        x: (..., in) input; its rows are the product of the leading dims.
        weight: (out, in) weight, row-major (an ``nn.Linear``'s).
        bias: (out,) or None.
    """
    k = weight.shape[-1]
    rows = x.numel() // k if k else 0
    blocks = min(torch.get_num_threads(), weight.shape[0] // MIN_BLOCK)
    if (
        blocks < 2
        or rows > MAX_ROWS
        or x.device.type != "cpu"
        or torch.is_grad_enabled()
        or not weight.is_contiguous()
    ):
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    size = n // blocks
    split = size * blocks
    x2 = x.reshape(rows, k)
    # (blocks, size, in) -> (blocks, in, size): each block is one thread's product
    out = torch.matmul(x2.unsqueeze(0), weight[:split].view(blocks, size, k).transpose(1, 2))
    out = out.transpose(0, 1).reshape(rows, split)  # a view at one row
    if split < n:  # the columns left over (fewer than the number of blocks)
        out = torch.cat([out, torch.mm(x2, weight[split:].t())], dim=1)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], n)


class RowLinear(nn.Linear):
    """``nn.Linear`` whose decoding-step products use :func:`row_linear` (the same parameters,
    state dict and function; a subclass, so ``isinstance(m, nn.Linear)`` holds for every tool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_linear(x, self.weight, self.bias)


def use_row_linear(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`RowLinear` in place (the class
    only: parameters, buffers and hooks stay as they are). Returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = RowLinear
            changed += 1
    return changed
