"""Convert a BiFormer checkpoint (official classifier, official dense/detection, a full segmentor or
detector) to effvision's format.

    python tools/model_converters/biformer_to_effvision.py SRC DST [--prefix backbone]

BiFormer's ``init_cfg=dict(type='Pretrained', checkpoint=SRC)`` converts on load as well; this
tool is for publishing a converted file or inspecting what maps. It prints the detected format,
how many tensors were converted and how many were dropped (the ImageNet classifier's final
BatchNorm and head, or a segmentor's decode heads and neck).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from effvision.models.backbones.biformer import convert_checkpoint_state, detect_format
from effvision.utils import CheckpointError, extract_state_dict, load_checkpoint_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint path or URL')
    parser.add_argument('dst', help='output .pth path')
    parser.add_argument(
        '--prefix',
        default=None,
        help='keep only keys under this prefix (a "backbone." prefix is detected by itself)',
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
        converted = convert_checkpoint_state(state)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    dropped = len(state) - len(converted)
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + '.tmp')
    torch.save({'state_dict': converted, 'meta': {'converted_from': str(args.src)}}, tmp)
    os.replace(tmp, dst)  # never leave a half-written file under the final name
    print(
        f'{fmt}: converted {len(converted)} tensors ({dropped} dropped: classifier norm/head or '
        f'non-backbone keys) -> {dst}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
