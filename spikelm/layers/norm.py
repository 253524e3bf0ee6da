import torch
import torch.nn.functional as F
from torch import nn

from .op_counts import OpCount


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (starting at init_scale), computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, init_scale: float = 1.0):
        super().__init__()
        self.init_scale = float(init_scale)
        self.weight = nn.Parameter(torch.full((hidden_size,), self.init_scale))
        self.eps = eps

    def op_counts(self, inputs) -> dict[str, OpCount]:
        """Energy accounting: none of its own here; the NeuronLayer that owns the norm counts it."""
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
