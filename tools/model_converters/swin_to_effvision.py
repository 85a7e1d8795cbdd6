"""Convert a Swin checkpoint (official, mmseg/mmdet, or a full segmentor) to effvision's format.

    python tools/model_converters/swin_to_effvision.py SRC DST [--prefix backbone] [--window 12]

Swin's ``init_cfg=dict(type='Pretrained', checkpoint=SRC)`` converts on load as well; this tool is
for publishing a converted file or inspecting what maps. It prints how many tensors were
converted and which ones were dropped (derived buffers, classifier head).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from effvision.models.backbones.swin import checkpoint_filter_fn
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
        converted = checkpoint_filter_fn(state)
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
        f'converted {len(converted)} tensors ({dropped} dropped: derived buffers / head) -> {dst}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
