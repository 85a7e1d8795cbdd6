"""Convert a Next-ViT checkpoint (official, timm, full segmentor/detector) to effvision format.

    python tools/model_converters/nextvit_to_effvision.py SRC DST [--prefix backbone]

Accepted: the official ImageNet checkpoints (``model`` key, ``features.*``, final ``norm`` and
``proj_head``), the official ADE20K/COCO releases (``backbone.`` prefix: pass ``--prefix
backbone``), timm's ``nextvit_*`` weights, and effvision's own. ``NextViT``'s
``init_cfg=dict(type='Pretrained', checkpoint=SRC)`` converts on load as well; this tool is for
publishing a converted file or inspecting what maps. It prints the detected format, how many
tensors were converted and how many were dropped (classifier head, the unused
``extra_norm_list.3``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from effvision.models.backbones.nextvit import convert_official, convert_timm, detect_format
from effvision.utils import CheckpointError, extract_state_dict, load_checkpoint_file


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
        fmt = detect_format(state)
        converted = convert_timm(state) if fmt == 'timm' else convert_official(state)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    dropped = len(state) - len(converted)
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + '.tmp')
    meta = {'converted_from': str(args.src), 'source_format': fmt}
    torch.save({'state_dict': converted, 'meta': meta}, tmp)
    os.replace(tmp, dst)  # never leave a half-written file under the final name
    print(
        f'{fmt} checkpoint: converted {len(converted)} tensors '
        f'({dropped} dropped: classifier head / unused norm) -> {dst}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
