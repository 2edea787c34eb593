"""One in-memory form for every integer weight-only format, whatever its layout on disk.

w[o, i] = (q[o, i] - zero[o, g(i)]) * scale[o, g(i)], with g(i) = g_idx[i] when the checkpoint
was quantized in activation order (GPTQ desc_act / actorder), else i // group_size. q and zero
are unsigned (0 .. 2^bits - 1): each layout's loader moves its values there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class IntWeights:
    bits: int
    qweight: torch.Tensor  # [out, in] int32, unsigned values
    zeros: torch.Tensor  # [out, groups] int32, unsigned values
    scales: torch.Tensor  # [out, groups] float
    # [in] group of each input feature, or None for contiguous groups of in/groups features.
    g_idx: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.qweight.shape[1] // self.scales.shape[1]

    def groups_of_inputs(self) -> torch.Tensor:
        """[in] the group of every input feature."""
        if self.g_idx is not None:
            return self.g_idx.long()
        columns = torch.arange(self.qweight.shape[1], device=self.qweight.device)
        return columns // self.group_size

    def contiguous_order(self) -> torch.Tensor | None:
        """A permutation of the input features after which every group is one contiguous run
        of group_size features (as the packed CPU kernels need), or None when g_idx is not
        such a grouping. The identity for checkpoints without g_idx."""
        groups = self.groups_of_inputs()
        order = torch.argsort(groups, stable=True)
        expected = torch.arange(groups.numel(), device=groups.device) // self.group_size
        return order if torch.equal(groups[order], expected) else None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [out, in] weight, computed in float32 then cast to `dtype`."""
        groups = self.groups_of_inputs()
        zeros = self.zeros[:, groups].float()
        scales = self.scales[:, groups].float()
        return ((self.qweight.float() - zeros) * scales).to(dtype)
