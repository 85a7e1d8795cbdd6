"""Convert an official DAFormer checkpoint (lhoyer/DAFormer, mmseg 0.16) to effvision's format.

    python tools/model_converters/daformer_to_effvision.py SRC DST

The head keeps its parameter names; the NVlabs MiT backbone becomes mmseg's
``MixVisionTransformer``; a UDA checkpoint keeps its student (``model.``), EMA teacher
(``ema_model.``) and ImageNet copy (``imnet_model.``), which is the layout of effvision's
``DACS``, so the result loads into the configs in configs/daformer/ (``tools/test.py CONFIG DST``
evaluates the student, as the official code does).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from effvision.models.decode_heads.daformer_head import convert_official
from effvision.utils import CheckpointError, extract_state_dict, load_checkpoint_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint path or URL')
    parser.add_argument('dst', help='output .pth path')
    args = parser.parse_args(argv)
    try:
        state = extract_state_dict(load_checkpoint_file(args.src))
        converted = convert_official(state)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + '.tmp')
    torch.save({'state_dict': converted, 'meta': {'converted_from': str(args.src)}}, tmp)
    os.replace(tmp, dst)  # never leave a half-written file under the final name
    print(f'converted {len(state)} tensors into {len(converted)} -> {dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
