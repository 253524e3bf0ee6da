"""Argument checks shared by the neurons."""
from __future__ import annotations

import torch


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_sequence_input(who: str, x, channels: int) -> None:
    """x must be a floating [B, T, channels] tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{who}: x must have shape [B, T, C={channels}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] != channels:
        raise ValueError(f"{who}: x has {x.shape[-1]} channels in its last dim, expected {channels}")


def check_step_input(who: str, x_t, channels: int) -> None:
    if not isinstance(x_t, torch.Tensor):
        raise TypeError(f"{who}.step: x_t must be a torch.Tensor, got {type(x_t).__name__}")
    if x_t.dim() != 2 or x_t.shape[-1] != channels:
        raise ValueError(f"{who}.step: x_t must have shape [B, C={channels}], got {tuple(x_t.shape)}")
    if not x_t.is_floating_point():
        raise TypeError(f"{who}.step: x_t must be a floating-point tensor, got {x_t.dtype}")
