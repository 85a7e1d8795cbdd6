"""tools/train.py and tools/test.py with the mask-classification heads, semantic and panoptic.

A few iterations of each synthetic config (64x64 images, batch 2) through the tools, as a user runs
them; tools/test.py then evaluates the checkpoint: mIoU (mmseg's IoUMetric) for the semantic
configs, PQ and the semantic output's mIoU for the panoptic ones. Whether the heads learn is the
learns tier's question (tests/learns/test_mask_classification_learns.py).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, data_options

CONFIGS = {
    'pem': 'configs/pem/pem_swin-nano_1xb8-2k_shapes-128x128.py',
    'kmax': 'configs/kmax_deeplab/kmax-deeplab_swin-nano_1xb8-2k_shapes-128x128.py',
    'pem-panoptic': 'configs/pem/pem_swin-nano_1xb8-2k_shapes-panoptic-128x128.py',
    'kmax-panoptic': (
        'configs/kmax_deeplab/kmax-deeplab_swin-nano_1xb8-2k_shapes-panoptic-128x128.py'
    ),
}
FAST = [
    'train_cfg.max_iters=2',
    'train_cfg.val_interval=2',
    'default_hooks.checkpoint.interval=2',
    'train_dataloader.batch_size=2',
    'train_dataloader.num_workers=0',
    'train_dataloader.persistent_workers=False',
    'val_dataloader.num_workers=0',
    'val_dataloader.persistent_workers=False',
    'test_dataloader.num_workers=0',
    'test_dataloader.persistent_workers=False',
]


def _run(*args) -> str:
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_train_then_test(name, shapes_root, tmp_path):
    config = CONFIGS[name]
    options = [*FAST, *data_options(shapes_root)]
    work_dir = tmp_path / 'work'
    _run('tools/train.py', config, '--work-dir', work_dir, '--cfg-options', *options)
    checkpoint = (work_dir / 'last_checkpoint').read_text().strip()
    out = _run('tools/test.py', config, checkpoint, '--work-dir', work_dir / 'test',
               '--cfg-options', *options)  # fmt: skip
    final = out[out.rindex('Iter(test)') :]
    assert re.search(r'mIoU: [0-9.]+', final), final
    if name.endswith('panoptic'):
        assert re.search(r'coco_panoptic/PQ: [0-9.]+', final), final
        assert re.search(r'coco_panoptic/PQ_st: [0-9.]+', final), final
