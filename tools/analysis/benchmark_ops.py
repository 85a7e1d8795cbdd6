"""Fused attention ops against their reference and what users would pick instead, per stage shape.

Window attention at the Swin-T and CSWin-T stage shapes of a 512x512 input, as whole attention
modules on a (1, H, W, C) normalised map, qkv and output projections included (that is where the
implementations differ: what each does around the attention core):

* ``fused``: effvision's module through the compiled kernel;
* ``reference``: the same module through the op's PyTorch reference (``EFFVISION_OPS=reference``);
* ``sdpa+mask``: what one writes with PyTorch alone: pad, roll, 6-D partition, one
  ``F.scaled_dot_product_attention`` with the bias and shift mask folded into one additive mask
  broadcast over windows x heads, reverse, roll back, crop;
* ``timm``: ``timm.models.swin_transformer.SwinTransformerBlock._attn`` (Swin shapes);
* ``mmseg``: ``mmseg.models.backbones.swin.ShiftWindowMSA`` (Swin shapes).

Routing attention at BiFormer-S stage 2 and 3 shapes (ADE20K's ``n_win=8``), the op alone on q, k,
v maps (channel slices of one projection): ``fused``, ``reference``, and ``official``: the
semantics of rayleizhu/BiFormer ``ops/bra_legacy.py`` (rewritten here: region means, top-k, a
``torch.gather`` of the top-k regions' keys and values from a ``topk``-times expanded view, matmul
softmax), on the region-laid-out tensors it receives.

Plus the whole Swin-T backbone forward at 512x512 with fused ops and with the reference. Each
measurement runs in a fresh process: the median of ``--repeats`` runs after warm-up, and the
peak memory one run adds (CPU: peak resident set; CUDA: allocator peak). Forward runs under
``no_grad``; ``fwd+bwd`` backpropagates a fixed gradient into the input and the parameters.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from effvision.utils.benchmark import machine, peak_memory_bytes, run_job, timed

SIZE = 512
# (name, H, W, C, heads, window, shift): Swin-T stages at 512 (the shifted block of each stage)
SWIN_T = [
    (f'Swin-T stage {i + 1}', SIZE // 4 >> i, SIZE // 4 >> i, 96 << i, 3 << i) for i in range(4)
]
# CSWin-T stages 1-3 at 512 (stripe widths 1, 2, 7; stage 4 is global attention)
CSWIN_T = [
    (f'CSWin-T stage {i + 1}', SIZE // 4 >> i, SIZE // 4 >> i, 64 << i, 2 << i, split)
    for i, split in enumerate((1, 2, 7))
]

# BiFormer-S stages 2 and 3 at 512 with n_win 8: (name, H, W, C, heads, n_win, topk)
BIFORMER_S = [
    ('BiFormer-S stage 2', SIZE // 8, SIZE // 8, 128, 4, 8, 4),
    ('BiFormer-S stage 3', SIZE // 16, SIZE // 16, 256, 8, 8, 16),
]


# -- implementations ----------------------------------------------------------------------------
def official_routing(q: torch.Tensor, kv: torch.Tensor, heads: int, topk: int) -> torch.Tensor:
    """The official legacy op's semantics on region layout: q (n, R, N, c), kv (n, R, N, 2c)."""
    n, r, tokens, c = q.shape
    scale = c**-0.5
    q_region, k_region = q.detach().mean(2), kv[..., :c].detach().mean(2)
    index = torch.topk((q_region * scale) @ k_region.transpose(-2, -1), topk, dim=-1).indices
    selected = torch.gather(
        kv.view(n, 1, r, tokens, 2 * c).expand(-1, r, -1, -1, -1),
        dim=2,
        index=index.view(n, r, topk, 1, 1).expand(-1, -1, -1, tokens, 2 * c),
    )  # (n, R, topk, N, 2c): topk copies of the keys and values
    k_sel, v_sel = selected.split([c, c], dim=-1)
    d = c // heads
    k_sel = k_sel.reshape(n * r, topk * tokens, heads, d).permute(0, 2, 3, 1)
    v_sel = v_sel.reshape(n * r, topk * tokens, heads, d).permute(0, 2, 1, 3)
    q = q.reshape(n * r, tokens, heads, d).permute(0, 2, 1, 3)
    return torch.softmax((q * scale) @ k_sel, dim=-1) @ v_sel


class Routing(torch.nn.Module):
    """Routing attention alone; ``official`` takes region-laid-out inputs (its own layout)."""

    def __init__(self, impl: str, heads: int, n_win: int, topk: int) -> None:
        super().__init__()
        self.impl, self.heads, self.n_win, self.topk = impl, heads, n_win, topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from effvision.ops.routing_attention import routing_attention

        c = x.shape[-1] // 3
        if self.impl == 'official':
            return official_routing(x[..., :c], x[..., c:], self.heads, self.topk)
        q, k, v = x.split(c, dim=-1)
        return routing_attention(q, k, v, self.n_win, self.topk, self.heads)[0]


class SdpaMaskWindowAttention(torch.nn.Module):
    """Shifted-window attention written with stock PyTorch ops and one additive SDPA mask."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        from effvision.models.backbones.swin import relative_position_index

        self.heads, self.window, self.shift = heads, window, shift
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.table = torch.nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        self.register_buffer('index', relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, s, n = self.window, self.shift, self.window**2
        y = F.pad(x, (0, 0, 0, -w % ws, 0, -h % ws))
        hp, wp = y.shape[1:3]
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        nw = y.shape[0] // b
        q, k, v = self.qkv(y).view(b * nw, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)[None]
        if s:
            region = torch.zeros(1, hp, wp, 1, device=x.device)
            for i, rows in enumerate((slice(0, -ws), slice(-ws, -s), slice(-s, None))):
                for j, cols in enumerate((slice(0, -ws), slice(-ws, -s), slice(-s, None))):
                    region[:, rows, cols] = 3 * i + j
            region = region.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, n)
            shift_mask = (region[:, :, None] != region[:, None, :]).float() * -100.0
            mask = (mask + shift_mask[:, None]).repeat(b, 1, 1, 1)  # (B * nW, heads, N, N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.proj(y.transpose(1, 2).reshape(b, hp // ws, wp // ws, ws, ws, c))
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        return y[:, :h, :w].contiguous()


def build(job: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """The module and its input for one job."""
    impl, shape = job['impl'], job['shape']
    if job['case'] == 'routing':
        h, w, c, heads, n_win, topk = shape
        x = torch.randn(1, h, w, 3 * c)
        if impl == 'official':  # regions: (1, R, N, 3C)
            rh, rw = h // n_win, w // n_win
            x = (
                x.view(1, n_win, rh, n_win, rw, 3 * c)
                .transpose(2, 3)
                .reshape(1, -1, rh * rw, 3 * c)
            )
        return Routing(impl, heads, n_win, topk), x
    if job['case'] == 'backbone':
        from effvision.models.backbones.swin import Swin

        return Swin(arch='tiny'), torch.randn(1, 3, SIZE, SIZE)
    if job['case'] == 'cswin':
        from effvision.models.backbones.cswin import CrossShapedAttention, stripe_layout

        h, w, c, heads, split = shape
        attn = CrossShapedAttention(c, heads, global_attn=False, qkv_bias=True, attn_drop=0.0)

        class Stripes(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attn = attn

            def forward(self, x):
                layouts = tuple(
                    stripe_layout(h, w, split, i == 0, 0, 1, x.dtype, x.device) for i in range(2)
                )
                return self.attn(x, layouts)

        return Stripes(), torch.randn(1, h, w, c)
    h, w, c, heads = shape
    window, shift = 7, 3
    x = torch.randn(1, h, w, c)
    if impl in ('fused', 'reference'):
        from effvision.models.backbones.swin import WindowAttention

        attn = WindowAttention(c, heads, window, qkv_bias=True, attn_drop=0.0, proj_drop=0.0)

        class Ours(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attn = attn

            def forward(self, x):
                return self.attn(x, shift)

        return Ours(), x
    if impl == 'sdpa+mask':
        return SdpaMaskWindowAttention(c, heads, window, shift), x
    if impl == 'timm':
        from timm.models.swin_transformer import SwinTransformerBlock

        block = SwinTransformerBlock(c, (h, w), heads, window_size=window, shift_size=shift)

        class Timm(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.block = block

            def forward(self, x):
                return self.block._attn(x)

        return Timm(), x
    if impl == 'mmseg':
        from mmseg.models.backbones.swin import ShiftWindowMSA

        msa = ShiftWindowMSA(c, heads, window_size=window, shift_size=shift)

        class Mmseg(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.msa = msa

            def forward(self, x):
                return self.msa(x.flatten(1, 2), (h, w))

        return Mmseg(), x
    raise ValueError(f'unknown implementation {impl!r}')


def measure(job: dict) -> dict:
    """Runs in a child process: build, warm up, time and measure peak memory of one job."""
    torch.set_num_threads(job['threads'])
    if job['impl'] == 'reference':
        os.environ['EFFVISION_OPS'] = 'reference'
    device = torch.device(job['device'])
    module, x = build(job)
    module, x = module.to(device).eval(), x.to(device)
    if job['mode'] == 'fwd':

        def run() -> None:
            with torch.no_grad():
                module(x)

    else:
        x.requires_grad_(True)
        grad = torch.randn_like(module(x))

        def run() -> None:
            module(x).backward(grad)

    run()
    peak = peak_memory_bytes(run, device)
    return dict(ms=timed(run, job['repeats'], warmup=1) * 1e3, peak_mib=peak / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--modes', nargs='+', default=['fwd', 'fwd+bwd'])
    parser.add_argument('--only', nargs='+', help='cases whose name contains one of these')
    parser.add_argument('--out', type=Path, help='also write the markdown table here')
    parser.add_argument('--job', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return
    torch.set_num_threads(args.threads)
    header = machine() + f'; batch 1, {SIZE}x{SIZE} input, float32, {args.device}'
    print(header, flush=True)
    lines = [
        '| case | shape (H, W, C, heads) | mode | implementation | ms | peak MiB '
        '| fused speed-up |',
        '|---|---|---|---|---|---|---|',
    ]
    print('\n'.join(lines), flush=True)
    cases = [('swin', name, shape, ['fused', 'reference', 'sdpa+mask', 'timm', 'mmseg'])
             for name, *shape in SWIN_T]  # fmt: skip
    cases += [('cswin', name, shape, ['fused', 'reference']) for name, *shape in CSWIN_T]
    cases += [('routing', name, shape, ['fused', 'reference', 'official'])
              for name, *shape in BIFORMER_S]  # fmt: skip
    cases += [('backbone', 'Swin-T backbone', [SIZE, SIZE, 3, 0], ['fused', 'reference'])]
    for case, name, shape, impls in cases:
        if args.only and not any(key in name for key in args.only):
            continue
        for mode in args.modes:
            if case == 'backbone' and mode != 'fwd':
                continue
            fused_ms = None
            for impl in impls:
                job = dict(case=case, shape=shape, impl=impl, mode=mode, repeats=args.repeats,
                           threads=args.threads, device=args.device)  # fmt: skip
                res = run_job(__file__, job)
                if 'error' in res:
                    line = (
                        f'| {name} | {tuple(shape)} | {mode} | {impl} | fails: {res["error"]} | | |'
                    )
                else:
                    fused_ms = res['ms'] if impl == 'fused' else fused_ms
                    ratio = f'{res["ms"] / fused_ms:.2f}x' if impl != 'fused' and fused_ms else ''
                    line = (f'| {name} | {tuple(shape)} | {mode} | {impl} | {res["ms"]:.2f} | '
                            f'{res["peak_mib"]:.1f} | {ratio} |')  # fmt: skip
                lines.append(line)
                print(line, flush=True)
    if args.out is not None:
        args.out.write_text(
            '# Fused ops: latency and memory\n\n'
            f'`python tools/analysis/benchmark_ops.py --device {args.device} --threads '
            f'{args.threads} --repeats {args.repeats}`\n\n{header}\n\n' + '\n'.join(lines) + '\n'
        )


if __name__ == '__main__':
    main()
