"""Convert an EfficientFormer (v1) or EfficientFormerV2 checkpoint to effvision's format.

    python tools/model_converters/efficientformer_to_effvision.py SRC DST [--prefix backbone]

Accepted: the official dense checkpoints (segmentation/detection ``*_feat`` backbones), the official
ImageNet checkpoints (``efficientformer_l1_300d.pth``, ``eformer_s0_450.pth``, ...), timm's
``efficientformer_l*``/``efficientformerv2_*`` weights, and full segmentor/detector checkpoints
with ``--prefix backbone``. The version (v1 or V2) and the format are detected from the keys.
``init_cfg=dict(type='Pretrained', checkpoint=SRC)`` converts on load as well; this tool is for
publishing a converted file or inspecting what maps. It prints how many tensors were converted
and which were dropped (index buffers, the dense code's unused ImageNet bias placeholders,
classifier heads and final norm).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from effvision.models.backbones import efficientformer, efficientformer_v2
from effvision.utils import CheckpointError, extract_state_dict, load_checkpoint_file


def convert(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(converted state, 'EfficientFormer <format>' or 'EfficientFormerV2 <format>')."""
    if any('.mlp.mid' in k for k in state):  # only V2 MLPs have the depthwise mid conv
        converted, fmt = efficientformer_v2.convert_to_effvision(state)
        return converted, f'EfficientFormerV2 {fmt}'
    converted, fmt = efficientformer.convert_to_effvision(state)
    return converted, f'EfficientFormer {fmt}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint path or URL')
    parser.add_argument('dst', help='output .pth path')
    parser.add_argument(
        '--prefix', default=None, help='keep only keys under this prefix, e.g. "backbone"'
    )
    args = parser.parse_args(argv)
    try:
        state = extract_state_dict(load_checkpoint_file(args.src))
        if args.prefix:
            prefix = args.prefix.rstrip('.') + '.'
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise CheckpointError(f'no key starts with {prefix!r}')
        converted, kind = convert(state)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    dropped = len(state) - len(converted)
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + '.tmp')
    torch.save(
        {'state_dict': converted, 'meta': {'converted_from': str(args.src), 'format': kind}}, tmp
    )
    os.replace(tmp, dst)  # never leave a half-written file under the final name
    print(
        f'{kind}: converted {len(converted)} tensors ({dropped} dropped: index buffers, unused '
        f'bias placeholders, classifier heads) -> {dst}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
