"""Inference latency of the mask-classification heads next to mmseg's Mask2Former head.

    python tools/analysis/benchmark_mask_heads.py [--size 512] [--repeats 5] [--threads N]
        [--backbone resnet50|swin-t] [--device cpu|cuda] [--out docs/models/mask_heads_cpu.md]

Each head is built at its published size for ADE20K (150 classes) on the same backbone (mmseg's
ResNet-50, channels 256-2048, or effvision's Swin-T, 96-768):

* effvision's ``PEMHead`` (NiccoloCavagnero/PEM ADE20K R50: 100 queries, 6 layers),
* effvision's ``KMaXHead`` (bytedance/kmax-deeplab R50: 128 queries, 6 kMaX layers, pixel
  decoder [1, 5, 1, 1]),
* mmseg's ``Mask2FormerHead`` (configs/mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py:
  100 queries, 9 layers, 6-layer deformable-attention pixel decoder).

Batch 1, float32, eval, ``torch.no_grad``; the median of ``--repeats`` runs after warm-up of (a)
the head alone on precomputed features, through ``predict`` (class and mask logits to per-class
scores at the input size, what ``EncoderDecoder`` calls) and (b) backbone + head. Each head runs
in its own process. Weights are random: latency does not depend on their values. Prints the
machine and versions first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from effvision.utils.benchmark import machine, run_job, timed

NUM_CLASSES = 150
CHANNELS = {'resnet50': [256, 512, 1024, 2048], 'swin-t': [96, 192, 384, 768]}
HEADS = ('PEMHead', 'KMaXHead', 'mmseg Mask2FormerHead')


def _backbone(name: str) -> torch.nn.Module:
    if name == 'resnet50':
        from mmseg.models.backbones import ResNet

        return ResNet(depth=50, out_indices=(0, 1, 2, 3))
    from effvision.models.backbones.swin import Swin

    return Swin(arch='tiny', out_indices=(0, 1, 2, 3))


def _head(kind: str, in_channels: list[int]) -> torch.nn.Module:
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from effvision.registry import MODELS
    from effvision.utils import register_all_modules

    register_all_modules()
    norm = dict(type='BN')
    if kind == 'PEMHead':
        return MODELS.build(
            dict(type='PEMHead', in_channels=in_channels, num_classes=NUM_CLASSES, norm_cfg=norm)
        )
    if kind == 'KMaXHead':
        return MODELS.build(
            dict(
                type='KMaXHead',
                in_channels=in_channels,
                num_classes=NUM_CLASSES,
                num_queries=128,
                pixel_decoder=dict(dec_layers=(1, 5, 1, 1), dec_channels=(512, 256, 128, 64)),
                norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01),
            )
        )
    import mmdet.models  # noqa: F401  (mmseg's Mask2FormerHead wraps mmdet's)
    import mmseg

    path = Path(mmseg.__file__).parent / '.mim/configs/mask2former'
    cfg = Config.fromfile(path / 'mask2former_r50_8xb2-160k_ade20k-512x512.py')
    head = cfg.model.decode_head
    head.in_channels = in_channels
    with DefaultScope.overwrite_default_scope('mmseg'):
        from mmseg.registry import MODELS as SEG_MODELS

        return SEG_MODELS.build(head)


def measure(job: dict) -> dict:
    torch.set_num_threads(job['threads'])
    device = torch.device(job['device'])
    backbone = _backbone(job['backbone']).to(device)
    head = _head(job['head'], CHANNELS[job['backbone']]).to(device)
    backbone.eval()  # mmseg's ResNet.train() returns None: no chaining
    head.eval()
    size = job['size']
    image = torch.randn(1, 3, size, size, device=device)
    metas = [dict(img_shape=(size, size), pad_shape=(size, size), ori_shape=(size, size))]
    with torch.no_grad():
        feats = backbone(image)
        head_s = timed(lambda: head.predict(feats, metas, None), job['repeats'])
        total_s = timed(lambda: head.predict(backbone(image), metas, None), job['repeats'])
        scores = head.predict(feats, metas, None)
    return dict(
        head_ms=head_s * 1e3,
        total_ms=total_s * 1e3,
        head_params_m=sum(p.numel() for p in head.parameters()) / 1e6,
        out_shape=list(scores.shape),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--backbone', default='resnet50', choices=sorted(CHANNELS))
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--out', type=Path, help='also write the markdown table here')
    parser.add_argument('--job', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return

    header = (
        machine() + f'; batch 1, {args.size}x{args.size}, float32, {args.device}, '
        f'backbone {args.backbone}, {NUM_CLASSES} classes'
    )
    print(header, flush=True)
    lines = [
        '| head | head params (M) | head latency (ms) | backbone + head (ms) | '
        'head speed vs Mask2Former |',
        '|---|---|---|---|---|',
    ]
    print('\n'.join(lines), flush=True)
    rows = {}
    for head in HEADS[::-1]:  # the reference first, so the ratio column can be filled
        job = dict(head=head, backbone=args.backbone, size=args.size, repeats=args.repeats,
                   threads=args.threads, device=args.device)  # fmt: skip
        rows[head] = run_job(__file__, job)
    reference = rows['mmseg Mask2FormerHead'].get('head_ms')
    for head in HEADS:
        res = rows[head]
        if 'error' in res:
            line = f'| {head} | | fails: {res["error"]} | | |'
        else:
            ratio = f'{reference / res["head_ms"]:.2f}x' if reference else ''
            if head.startswith('mmseg'):
                ratio = 'reference'
            line = (
                f'| {head} | {res["head_params_m"]:.1f} | {res["head_ms"]:.0f} | '
                f'{res["total_ms"]:.0f} | {ratio} |'
            )
        lines.append(line)
        print(line, flush=True)
    if args.out is not None:
        command = 'python tools/analysis/benchmark_mask_heads.py ' + ' '.join(
            f'--{k} {v}' for k, v in (('size', args.size), ('backbone', args.backbone),
                                      ('threads', args.threads), ('device', args.device))
        )  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f'`{command}`\n\n{header}\n\n' + '\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
