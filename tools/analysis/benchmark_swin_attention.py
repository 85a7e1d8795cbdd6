"""Time Swin's window attention formulations and the Swin backbone on this machine.

    python tools/analysis/benchmark_swin_attention.py [--batch 8 --windows 16 --tokens 64 ...]

Compares ``F.scaled_dot_product_attention`` on 5-D (B, nW, heads, N, d) tensors, on 4-D tensors
with the windows folded into the batch (what ``effvision``'s Swin does), and the explicit
matmul-softmax of the official code, forward and forward + backward, with the additive
bias + shift mask of a shifted block. Prints the machine and library versions first.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from effvision.utils.benchmark import machine, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--windows', type=int, default=16)
    parser.add_argument('--heads', type=int, default=1)
    parser.add_argument('--tokens', type=int, default=64, help='tokens per window (8x8)')
    parser.add_argument('--head-dim', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    print(machine())
    b, nw, h, n, d = args.batch, args.windows, args.heads, args.tokens, args.head_dim
    print(f'shape: batch {b}, windows {nw}, heads {h}, tokens {n}, head dim {d} (float32)')

    q, k, v = (torch.randn(b, nw, h, n, d, device=device, requires_grad=True) for _ in range(3))
    mask = torch.randn(nw, h, n, n, device=device)  # bias + shift mask of a shifted block
    scale = d**-0.5

    def sdpa_5d():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def sdpa_4d():
        return F.scaled_dot_product_attention(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
            attn_mask=mask.repeat(b, 1, 1, 1), scale=scale,
        )  # fmt: skip

    def matmul_softmax():
        return ((q * scale) @ k.transpose(-2, -1) + mask).softmax(-1) @ v

    results = {}
    for name, fn in (('sdpa 5-D', sdpa_5d), ('sdpa 4-D', sdpa_4d), ('matmul', matmul_softmax)):
        with torch.no_grad():
            fwd = timed(fn, args.repeats)
        both = timed(lambda fn=fn: fn().sum().backward(), args.repeats)
        results[name] = both
        print(f'{name:10s} forward {fwd * 1e3:8.2f} ms   forward+backward {both * 1e3:8.2f} ms')
    print(f'sdpa 4-D vs 5-D, forward+backward: {results["sdpa 5-D"] / results["sdpa 4-D"]:.2f}x')


if __name__ == '__main__':
    main()
