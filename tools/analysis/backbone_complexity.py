"""Parameters and FLOPs of every published backbone variant, next to the published figures.

    python tools/analysis/backbone_complexity.py [--sizes 224 512] [--out docs/models/complexity.md]

Builds each variant of every registered effvision backbone on the ``meta`` device (no memory, no
weights) and counts

* parameters of the dense backbone (per-output norms included, no classifier), and the
  classification model's count, ``backbone - dense-only norms + classifier head``, which is what
  papers publish;
* multiply-accumulates (reported as FLOPs, the convention of every paper here) of one forward at
  each square size, with ``torch.utils.flop_counter`` (convolutions, matmuls, attention; like fvcore
  it leaves out normalisation, activations and softmax).

The published figures (classification models at 224x224, ImageNet-1k head) are listed below with
their source; the table gives the relative difference and a reason where it exceeds 1 %.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from effvision.models.backbones.base import DenseBackbone, registered_backbones
from effvision.utils.benchmark import machine


@dataclass(frozen=True)
class Published:
    """A variant's published classification figures at 224x224 (unless ``size`` says otherwise).

    Attributes:
        params: Millions of parameters of the ImageNet classifier.
        flops: GMACs ("FLOPs" in the papers) at ``size``.
        heads: Linear 1000-way classifiers on the last stage (2 for distilled models).
        extra_head: Parameters of classification-only layers besides the linear heads (e.g. a
            pre-logits projection) that the dense backbone does not have.
        size: Input side the FLOPs were published at.
        source: Where the figures come from.
        note: Why a difference above 1 % is expected.
    """

    params: float
    flops: float
    heads: int = 1
    extra_head: int = 0
    size: int = 224
    source: str = ''
    note: str = ''


# (class name, arch) -> published classification figures.
PUBLISHED: dict[tuple[str, str], Published] = {
    ('Swin', 'tiny'): Published(28.3, 4.5, source='Swin README'),
    ('Swin', 'small'): Published(49.6, 8.7, source='Swin README'),
    ('Swin', 'base'): Published(87.8, 15.4, source='Swin README'),
    ('Swin', 'large'): Published(197.0, 34.5, source='Swin README'),
}


def dense_only_params(model: DenseBackbone) -> int:
    """Parameters of the per-output norms dense backbones add (absent from classifiers)."""
    names = getattr(model, 'dense_only_modules', None)
    if names is None:
        names = [n for n, _ in model.named_children() if n.startswith(('norm', 'out_norm'))]
    return sum(p.numel() for n in names for p in getattr(model, n).parameters())


def count_macs(model: torch.nn.Module, size: int) -> float:
    """GMACs of one forward of a (1, 3, size, size) input."""
    x = torch.empty(1, 3, size, size, device='meta')
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def rows(sizes: list[int], models: list[str] | None = None) -> list[list[str]]:
    table = []
    for cls in registered_backbones():
        if models and cls.__name__ not in models:
            continue
        for arch in cls.arch_settings:
            with torch.device('meta'):
                model = cls(arch=arch).eval()
            params = sum(p.numel() for p in model.parameters())
            macs = [count_macs(model, s) for s in sizes]
            pub = PUBLISHED.get((cls.__name__, arch))
            row = [cls.__name__, arch, f'{params / 1e6:.2f}']
            row += [f'{m:.2f}' for m in macs]
            if pub is None:
                row += ['', '', '', '', 'no published figure']
            else:
                last = model.num_features[-1]
                head = pub.heads * (last * 1000 + 1000) + pub.extra_head
                cls_params = (params - dense_only_params(model) + head) / 1e6
                d_params = 100 * (cls_params / pub.params - 1)
                pub_macs = count_macs(model, pub.size) if pub.size not in sizes else None
                ours = macs[sizes.index(pub.size)] if pub_macs is None else pub_macs
                d_flops = 100 * (ours / pub.flops - 1)
                row += [
                    f'{cls_params:.2f} / {pub.params:g}',
                    f'{d_params:+.1f} %',
                    f'{ours:.2f} / {pub.flops:g} @{pub.size}',
                    f'{d_flops:+.1f} %',
                    '; '.join(s for s in (pub.source, pub.note) if s),
                ]
            table.append(row)
    return table


def markdown(sizes: list[int], table: list[list[str]]) -> str:
    header = ['model', 'arch', 'params (M)'] + [f'GFLOPs {s}' for s in sizes]
    header += ['cls params ours / pub', 'Δ', 'GFLOPs ours / pub', 'Δ', 'source; note']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(r) + ' |' for r in table]
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 512])
    parser.add_argument('--models', nargs='+', help='class names to include (default: all)')
    parser.add_argument('--out', type=Path, help='also write the table (markdown) to this file')
    args = parser.parse_args()
    text = markdown(args.sizes, rows(args.sizes, args.models))
    print(machine())
    print(text)
    if args.out is not None:
        args.out.write_text(
            '# Backbone parameters and FLOPs\n\n'
            'Made by `python tools/analysis/backbone_complexity.py --out '
            f'{args.out}`; see the script for what is counted.\n\n' + text + '\n'
        )


if __name__ == '__main__':
    main()
