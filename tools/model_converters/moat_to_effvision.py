"""Convert a deeplab2 MOAT checkpoint (TensorFlow) to effvision's format.

    python tools/model_converters/moat_to_effvision.py SRC DST [--ema] [--prefix backbone]

SRC is one of
* a released checkpoint archive (``moat0_imagenet_1k_224_w_position_embedding.tar.gz``), its
  extracted folder, or a TF checkpoint prefix (``.../model.ckpt-NNNN``): read with TensorFlow,
  which only this step needs (``pip install tensorflow-cpu``; effvision never imports it);
* a ``.pth``/``.pt`` file of TF variable names (e.g. dumped elsewhere) or one of ours.

The MOAT backbone also converts TF-named ``.pth`` files on load
(``init_cfg=dict(type='Pretrained', checkpoint=...)``); this tool is the step from TensorFlow to
PyTorch. It prints how many tensors were converted and what was dropped (classifier head,
``/ExponentialMovingAverage`` shadows unless ``--ema``, optimizer slots).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from effvision.models.backbones.moat import convert_tf, detect_format
from effvision.utils import CheckpointError, extract_state_dict, load_checkpoint_file

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')


def read_tf_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every numeric variable of a TF checkpoint (folder or prefix) as float32/int tensors.

    TensorFlow is imported here, and only here.

    Raises:
        CheckpointError: TensorFlow is missing or the checkpoint cannot be read.
    """
    try:
        import tensorflow as tf
    except ImportError as err:
        raise CheckpointError(
            'reading a TensorFlow checkpoint needs TensorFlow, which effvision does not install: '
            '`pip install tensorflow-cpu` (in any environment), run this tool there, and use the '
            'written .pth afterwards'
        ) from err
    try:
        reader = tf.train.load_checkpoint(str(path))
        names = sorted(reader.get_variable_to_shape_map())
    except Exception as err:  # TF raises NotFoundError, DataLossError, ValueError, ...
        raise CheckpointError(f'could not read TF checkpoint {path}: {err}') from err
    state = {}
    for name in names:
        array = np.asarray(reader.get_tensor(name))
        if array.dtype.kind in 'iub':
            state[name] = torch.from_numpy(array.copy())
        elif array.dtype.kind == 'f' or array.dtype.name == 'bfloat16':
            state[name] = torch.from_numpy(array.astype(np.float32))
        # strings (the object graph) and other types carry no weights
    return state


def _checkpoint_in(folder: Path) -> Path:
    """The prefix of the (newest) TF checkpoint inside an extracted archive."""
    indexes = sorted(folder.rglob('*.index'), key=lambda p: p.stat().st_mtime)
    if not indexes:
        raise CheckpointError(f'no TF checkpoint (*.index) inside {folder}')
    return indexes[-1].with_suffix('')


def load_source(src: str) -> dict[str, torch.Tensor]:
    """The tensors of SRC, whatever its kind (see the module docstring)."""
    path = Path(src)
    if src.endswith(TORCH_SUFFIXES):
        return extract_state_dict(load_checkpoint_file(src))
    if not path.exists() and not Path(src + '.index').exists():
        raise CheckpointError(f'checkpoint not found: {src}')
    if src.endswith(('.tar.gz', '.tgz', '.tar')):
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as archive:
            if hasattr(tarfile, 'data_filter'):  # refuse absolute paths, links out, devices
                archive.extractall(tmp, filter='data')
            else:  # Python < 3.10.12 has no extraction filters
                archive.extractall(tmp)
            return read_tf_checkpoint(_checkpoint_in(Path(tmp)))
    if path.is_dir() and not (path / 'checkpoint').exists():
        return read_tf_checkpoint(_checkpoint_in(path))
    return read_tf_checkpoint(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='TF checkpoint (archive, folder or prefix) or .pth file')
    parser.add_argument('dst', help='output .pth path')
    parser.add_argument(
        '--ema', action='store_true', help='use the /ExponentialMovingAverage weights if present'
    )
    parser.add_argument(
        '--prefix', default=None, help='keep only keys under this prefix, e.g. "backbone"'
    )
    args = parser.parse_args(argv)
    try:
        state = load_source(args.src)
        if args.prefix:
            prefix = args.prefix.rstrip('.') + '.'
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise CheckpointError(f'no key starts with {prefix!r}')
        if detect_format(state) == 'tf':
            converted = convert_tf(state, use_ema=args.ema)
        else:
            converted = dict(state)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    passed = [k for k in converted if '/' in k]
    counters = sum(k.endswith('num_batches_tracked') for k in converted)
    variables = len(converted) - len(passed) - counters
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + '.tmp')
    torch.save({'state_dict': converted, 'meta': {'converted_from': str(args.src)}}, tmp)
    os.replace(tmp, dst)  # never leave a half-written file under the final name
    print(
        f'converted {variables} variables ({len(state) - variables - len(passed)} dropped: '
        f'classifier head, EMA shadows, optimizer slots) -> {dst}'
    )
    if passed:
        print(f'warning: {len(passed)} keys are not MOAT variables, kept as they are: {passed[:5]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
