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
        """Energy accounting: 2 MACs per element (square-accumulate; scale by rsqrt x gain). A NeuronLayer counts
        its own norm instead (eval.energy does not hook it twice)."""
        return {"norm": OpCount(mac=2.0 * inputs[0].numel())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
