"""Convert a CSWin checkpoint (official ImageNet or ADE20K UPerNet) to effvision's format.

    python tools/model_converters/cswin_to_effvision.py SRC DST [--prefix PREFIX] [--backbone-only]

CSWin's ``init_cfg=dict(type='Pretrained', checkpoint=SRC)`` converts on load as well; this tool is
for publishing a converted file, for loading a whole official UPerNet checkpoint with
``load_from`` (its ``backbone.`` keys are converted, the heads' keys are kept), or for inspecting
what maps. It prints the detected format, how many tensors were converted and how many dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from effvision.models.backbones.cswin import convert_checkpoint, detect_format
from effvision.utils import CheckpointError, extract_state_dict, load_checkpoint_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint path or URL')
    parser.add_argument('dst', help='output .pth path')
    parser.add_argument(
        '--prefix', default=None, help='keep only keys under this prefix, e.g. "model.backbone"'
    )
    parser.add_argument(
        '--backbone-only',
        action='store_true',
        help='of a segmentor checkpoint, write only the backbone (for init_cfg)',
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
        converted = convert_checkpoint(state)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    if fmt.startswith('segmentor:') and not args.backbone_only:
        # keep the heads: the result loads into an effvision UPerNet with load_from
        heads = {k: v for k, v in state.items() if not k.startswith('backbone.')}
        converted = {'backbone.' + k: v for k, v in converted.items()} | heads
        source = len(state)
    else:
        source = sum(1 for k in state if k.startswith('backbone.')) or len(state)
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + '.tmp')
    torch.save({'state_dict': converted, 'meta': {'converted_from': str(args.src)}}, tmp)
    os.replace(tmp, dst)  # never leave a half-written file under the final name
    print(
        f'{fmt} checkpoint: converted {len(converted)} tensors '
        f'({source - len(converted)} dropped: classifier head / final norm) -> {dst}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
