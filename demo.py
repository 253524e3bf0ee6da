"""A short DSN demo: one neuron layer trained in parallel form, streamed in serial form, same spikes.

    python demo.py [--channels 256] [--steps 4096]
"""
from __future__ import annotations

import argparse
import time

import torch

from spikelm.neurons import DSN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    neuron = DSN(args.channels)
    x = 2 * torch.randn(1, args.steps, args.channels)

    t0 = time.perf_counter()
    spikes, membrane = neuron(x, return_membrane=True)
    (spikes * torch.randn_like(spikes)).sum().backward()  # gradients reach the decay conv
    t_parallel = time.perf_counter() - t0

    t0 = time.perf_counter()
    state, serial = None, []
    with torch.no_grad():
        for t in range(args.steps):
            s, state = neuron.step(x[:, t], state)
            serial.append(s)
    t_serial = time.perf_counter() - t0
    serial = torch.stack(serial, dim=1)

    state_numbers = state.membrane.numel() + state.conv.numel()
    print(f"DSN({args.channels}) over {args.steps} steps")
    print(f"  parallel scan, forward+backward : {t_parallel * 1e3:8.1f} ms")
    print(f"  serial steps, forward only      : {t_serial * 1e3:8.1f} ms")
    print(f"  spikes identical                : {torch.equal(serial, spikes.detach())}")
    print(f"  max |membrane difference|       : {(state.membrane - membrane[:, -1].detach()).abs().max().item():.2e}")
    print(f"  serial state size               : {state_numbers} numbers (independent of the stream length)")
    print(f"  firing rate (mean spike / N)    : {spikes.mean().item() / neuron.max_spike:.4f}")
    print(f"  spike counts 0..{neuron.max_spike}             : {torch.bincount(spikes.detach().long().flatten()).tolist()}")
    print(f"  decay-conv gradient norm        : {neuron.conv_weight.grad.norm().item():.3e}")


if __name__ == "__main__":
    main()
