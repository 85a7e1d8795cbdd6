"""DAFormer's self-training adapts: on the synthetic target domain it beats source-only training.

The `learns` tier for DAFormer (head + UDA): the demo's two configs (`make demo-uda`), shrunk to
64x64 images and 400 iterations so both runs fit in about four CPU minutes, train through
tools/train.py on the labelled source domain, the UDA one also on unlabelled target images
(generated with another look and other scenes), and both are evaluated on the target domain's
validation images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from effvision.datasets.class_stats import collect_class_stats, write_class_stats
from effvision.datasets.synthetic import generate_shapes
from tests.conftest import REPO_ROOT

SOURCE_ONLY = REPO_ROOT / 'configs/daformer/daformer_swin-nano_1xb4-800_shapes-srconly-128x128.py'
UDA = REPO_ROOT / 'configs/daformer/daformer_swin-nano_1xb4-800_shapes2target-128x128.py'
# Measured with this test's settings on 2 CPU cores (target-domain mIoU, 60 validation images):
#   seed 0: source-only 21.13, UDA 33.45 (+12.3); seed 1: source-only 20.74, UDA 32.18 (+11.4)
# Each number moved by about 1 between the seeds; the assertion asks for about half the
# smallest gain seen.
MIN_GAIN = 6.0

_SHRINK = """
_base_ = ['{base}']
crop = (64, 64)
iters = 400
_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=crop, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop, cat_max_ratio={cat_max_ratio}),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
_test = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
model = dict(data_preprocessor=dict(size=crop))
val_dataloader = dict(num_workers=1, dataset=dict(data_root='{target}', pipeline=_test))
test_dataloader = val_dataloader
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=0, end=iters),
]
train_cfg = dict(max_iters=iters, val_interval=iters)
default_hooks = dict(checkpoint=dict(interval=iters))
"""


def _source_only(source: Path, target: Path) -> str:
    return _SHRINK.format(base=SOURCE_ONLY, target=target, cat_max_ratio=0.75) + (
        f"train_dataloader = dict(num_workers=1, dataset=dict(data_root='{source}', "
        'pipeline=_pipeline))\n'
    )


def _uda(source: Path, target: Path) -> str:
    text = _SHRINK.format(base=UDA, target=target, cat_max_ratio=0.75)
    return text + (
        '_target_pipeline = [dict(t, cat_max_ratio=1.0) if t["type"] == "RandomCrop" else t '
        'for t in _pipeline]\n'
        'train_dataloader = dict(num_workers=1, dataset=dict(\n'
        f"    source=dict(data_root='{source}', pipeline=_pipeline),\n"
        f"    target=dict(data_root='{target}', pipeline=_target_pipeline),\n"
        '    rare_class_sampling=dict(min_pixels=50)))\n'  # things are 4x smaller at 64x64
    )


def _train(config: Path, work_dir: Path) -> float:
    proc = subprocess.run(
        [sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (scalars,) = work_dir.glob('*/vis_data/scalars.json')
    metrics = [json.loads(line) for line in scalars.read_text().splitlines()]
    return [m['mIoU'] for m in metrics if 'mIoU' in m][-1]


def test_uda_beats_source_only_on_the_target_domain(tmp_path):
    source, target = tmp_path / 'source', tmp_path / 'target'
    generate_shapes(source, size=(64, 64), seed=0)
    generate_shapes(target, size=(64, 64), seed=1, domain='target')
    stats = collect_class_stats(source / 'annotations' / 'training', '.png', ignore_index=255)
    write_class_stats(stats, source)
    configs = {}
    for name, text in (
        ('source_only', _source_only(source, target)),
        ('uda', _uda(source, target)),
    ):
        configs[name] = tmp_path / f'{name}.py'
        configs[name].write_text(text)
    source_only = _train(configs['source_only'], tmp_path / 'work_source_only')
    uda = _train(configs['uda'], tmp_path / 'work_uda')
    print(f'target-domain mIoU: source-only {source_only:.2f}, UDA {uda:.2f}')
    assert uda - source_only >= MIN_GAIN, (
        f'UDA {uda:.2f} is not {MIN_GAIN} mIoU above source-only {source_only:.2f}'
    )
