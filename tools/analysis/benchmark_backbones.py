"""Forward latency and peak memory of every backbone variant, next to what users would pick instead.

    python tools/analysis/benchmark_backbones.py [--size 512] [--repeats 5] [--models CSWin ...]
        [--threads N] [--device cpu|cuda] [--out docs/models/benchmark_cpu.md]

For each published variant of every registered effvision backbone: batch 1, float32, eval mode,
``torch.no_grad``; the median of ``--repeats`` forwards after one warm-up, and the peak memory of
the forward above what the built model already holds (CPU: the process's peak RSS, reset before the
forward through ``/proc/self/clear_refs``; GPU: ``torch.cuda.max_memory_allocated``). Each
measurement runs in its own process so that one model's allocations cannot hide another's.

In the same run, the counterparts with the same architecture: timm's model (features_only) where
timm has the family (Swin, Next-ViT, EfficientFormer v1/v2) and mmseg's SwinTransformer. The
official implementations cannot run on this stack and are not timed. Next-ViT and EfficientFormer
are also timed in their deploy form (``switch_to_deploy()``, BatchNorms folded). Weights are random:
latency does not depend on their values. Prints the machine and versions first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from effvision.utils.benchmark import machine, peak_memory_bytes, run_job, timed

# effvision (class, arch) -> counterparts: ('timm', model name, kwargs) or ('mmseg', class, kwargs)
SWIN_MMSEG = {
    'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'large': dict(embed_dims=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
SWIN_TIMM = {
    'tiny': 'swin_tiny_patch4_window7_224',
    'small': 'swin_small_patch4_window7_224',
    'base': 'swin_base_patch4_window7_224',
    'large': 'swin_large_patch4_window7_224',
}


def counterparts(name: str, arch: str, size: int) -> list[tuple[str, str, dict]]:
    if name == 'Swin':
        return [
            ('timm', SWIN_TIMM[arch], dict(img_size=size)),
            ('mmseg', 'SwinTransformer', dict(SWIN_MMSEG[arch], window_size=7)),
        ]
    if name == 'NextViT':
        return [('timm', f'nextvit_{arch}', {})]
    if name == 'EfficientFormer':
        return [('timm', f'efficientformer_{arch}', dict(img_size=size))]
    if name == 'EfficientFormerV2':
        return [('timm', f'efficientformerv2_{arch}', dict(img_size=size))]
    return []


def has_deploy_form(model: torch.nn.Module) -> bool:
    return callable(getattr(model, 'switch_to_deploy', None))


def build(kind: str, name: str, arch: str, kwargs: dict) -> torch.nn.Module:
    if kind == 'effvision' or kind == 'effvision-deploy':
        from effvision.registry import MODELS
        from effvision.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        model = MODELS.get(name)(arch=arch)
        if kind == 'effvision-deploy':
            model.switch_to_deploy()
        return model
    if kind == 'timm':
        import timm

        return timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    if kind == 'mmseg':
        from mmseg.registry import MODELS as MMSEG_MODELS
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        return MMSEG_MODELS.build(dict(type=name, **kwargs))
    raise ValueError(f'unknown model kind {kind!r}')


def measure(job: dict) -> dict:
    """Runs in a child process: build, warm up, time, and measure the forward's peak memory."""
    torch.set_num_threads(job['threads'])
    device = torch.device(job['device'])
    model = build(job['kind'], job['name'], job['arch'], job['kwargs']).to(device)
    model.eval()  # not chained: mmseg's SwinTransformer.train() returns None
    x = torch.randn(1, 3, job['size'], job['size'], device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    forward()
    peak = peak_memory_bytes(forward, device)
    seconds = timed(forward, job['repeats'], warmup=0)
    params = sum(p.numel() for p in model.parameters())
    return dict(ms=seconds * 1e3, peak_mib=peak / 2**20, params_m=params / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--models', nargs='+', help='effvision class names (default: all)')
    parser.add_argument('--archs', nargs='+', help='only these arch names')
    parser.add_argument('--out', type=Path, help='also write the markdown table here')
    parser.add_argument('--job', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return

    from effvision.models.backbones.base import registered_backbones

    torch.set_num_threads(args.threads)
    header = machine() + f'; batch 1, {args.size}x{args.size}, float32, {args.device}'
    print(header, flush=True)
    lines = [
        '| model | arch | implementation | params (M) | latency (ms) | peak memory (MiB) | '
        'effvision speed-up |',
        '|---|---|---|---|---|---|---|',
    ]
    print('\n'.join(lines), flush=True)
    for cls in registered_backbones():
        if args.models and cls.__name__ not in args.models:
            continue
        for arch in cls.arch_settings:
            if args.archs and arch not in args.archs:
                continue
            kinds = [('effvision', cls.__name__, {})]
            with torch.device('meta'):
                if has_deploy_form(cls(arch=arch)):
                    kinds.append(('effvision-deploy', cls.__name__, {}))
            kinds += counterparts(cls.__name__, arch, args.size)
            ours_ms = None
            for kind, name, kwargs in kinds:
                job = dict(
                    kind=kind, name=name, arch=arch, kwargs=kwargs, size=args.size,
                    repeats=args.repeats, threads=args.threads, device=args.device,
                )  # fmt: skip
                res = run_job(__file__, job)
                label = kind if kind.startswith('effvision') else f'{kind} {name}'
                if 'error' in res:
                    line = f'| {cls.__name__} | {arch} | {label} | | fails: {res["error"]} | | |'
                else:
                    if kind == 'effvision':
                        ours_ms = res['ms']
                    ratio = ''
                    if not kind.startswith('effvision') and ours_ms:
                        ratio = f'{res["ms"] / ours_ms:.2f}x'
                    line = (
                        f'| {cls.__name__} | {arch} | {label} | {res["params_m"]:.1f} | '
                        f'{res["ms"]:.1f} | {res["peak_mib"]:.0f} | {ratio} |'
                    )
                lines.append(line)
                print(line, flush=True)
    if args.out is not None:
        args.out.write_text(
            '# Backbone latency and memory\n\n'
            f'`python tools/analysis/benchmark_backbones.py --size {args.size} --device '
            f'{args.device} --threads {args.threads} --repeats {args.repeats}`\n\n'
            f'{header}\n\n' + '\n'.join(lines) + '\n'
        )


if __name__ == '__main__':
    main()
