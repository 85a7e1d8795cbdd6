"""tools/train.py, tools/test.py and the dist_*.sh launchers, run as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import QUICKSTART, TINY_CONFIG, data_options
from tests.conftest import REPO_ROOT as REPO


# The quickstart runs are `slow` here (minutes of subprocesses); `make test-all` runs them.
# Configs under test: a tiny ResNet + FCN (tests/data), and the quickstart config.
@pytest.fixture(scope='module', params=['tiny', pytest.param('quickstart', marks=pytest.mark.slow)])
def config(request) -> Path:
    """A config file path: the tiny fixture or the quickstart config."""
    return QUICKSTART if request.param == 'quickstart' else TINY_CONFIG


# ---------------------------------------------------------------------------------------------

# A few iterations, checkpoints at 2 and 4 (all kept), and only 2 validation images.
FAST = [
    'train_cfg.max_iters=4',
    'train_cfg.val_interval=4',
    'default_hooks.checkpoint.interval=2',
    'default_hooks.checkpoint.max_keep_ckpts=-1',
    'default_hooks.logger.interval=1',
    'train_dataloader.batch_size=2',
    'train_dataloader.num_workers=0',
    'train_dataloader.persistent_workers=False',
    'val_dataloader.num_workers=0',
    'val_dataloader.persistent_workers=False',
    'val_dataloader.dataset.indices=2',
    'test_dataloader.num_workers=0',
    'test_dataloader.persistent_workers=False',
    'test_dataloader.dataset.indices=2',
]


def run(
    *args: str | Path, cwd: Path = REPO, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Runs a command line (``python`` = this interpreter) and returns its completed process."""
    cmd = [sys.executable if a == 'python' else str(a) for a in args]
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope='module')
def trained(config, shapes_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A work dir after `tools/train.py` ran 4 iterations of ``config``."""
    work_dir = tmp_path_factory.mktemp('work_dirs') / config.stem
    proc = run(
        'python', REPO / 'tools/train.py', config, '--work-dir', work_dir,
        '--cfg-options', *FAST, *data_options(shapes_root),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work_dir, proc


def test_train_writes_mmseg_work_dir_layout(trained, config):
    work_dir, proc = trained
    assert (work_dir / config.name).is_file()  # the dumped config
    assert (work_dir / 'iter_2.pth').is_file() and (work_dir / 'iter_4.pth').is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith('iter_4.pth')
    run_dir = min(d for d in work_dir.iterdir() if d.is_dir())  # the first launch's log dir
    assert re.fullmatch(r'\d{8}_\d{6}', run_dir.name)
    assert (run_dir / f'{run_dir.name}.log').is_file()
    scalars = [
        json.loads(line)
        for line in (run_dir / 'vis_data' / 'scalars.json').read_text().splitlines()
    ]
    assert [s['step'] for s in scalars if 'loss' in s] == [1, 2, 3, 4]
    assert any('mIoU' in s for s in scalars)  # validation ran at the end
    assert 'Iter(train) [4/4]' in proc.stdout + proc.stderr


def test_resume_from_explicit_path_continues_from_that_iteration(trained, config, shapes_root):
    work_dir, _ = trained
    proc = run(
        'python', REPO / 'tools/train.py', config, '--work-dir', work_dir,
        '--resume', work_dir / 'iter_2.pth', '--cfg-options', *FAST, *data_options(shapes_root),
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert 'resumed epoch: 0, iter: 2' in log
    assert 'Iter(train) [3/4]' in log and 'Iter(train) [1/4]' not in log


def test_bare_resume_continues_from_latest_checkpoint(trained, config, shapes_root, tmp_path):
    work_dir, _ = trained
    # a copy: the other tests read the original work dir
    resumed = tmp_path / config.stem
    resumed.mkdir()
    (resumed / 'iter_4.pth').write_bytes((work_dir / 'iter_4.pth').read_bytes())
    (resumed / 'last_checkpoint').write_text(str(resumed / 'iter_4.pth'))
    proc = run(
        'python', REPO / 'tools/train.py', config, '--work-dir', resumed, '--resume',
        '--cfg-options', *FAST, 'train_cfg.max_iters=5', 'train_cfg.val_interval=10',
        *data_options(shapes_root),
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert 'resumed epoch: 0, iter: 4' in log and 'Iter(train) [5/5]' in log


def test_test_tool_evaluates_writes_out_pngs_and_show_dir(trained, config, shapes_root, tmp_path):
    work_dir, _ = trained
    out = tmp_path / 'preds'
    # No --work-dir: the metrics go to ./work_dirs/<config stem>/<timestamp>/ (mmseg's default).
    proc = run(
        'python', REPO / 'tools/test.py', config, work_dir / 'iter_4.pth', '--out', out,
        '--show-dir', tmp_path / 'show', '--cfg-options', *FAST, *data_options(shapes_root),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    val_images = sorted((shapes_root / 'images' / 'validation').iterdir())[:2]
    assert sorted(p.name for p in out.iterdir()) == sorted(f'{p.stem}.png' for p in val_images)
    for png in out.iterdir():
        label = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(shapes_root / 'images' / 'validation' / png.name))
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        assert label.max() < 9
    # --show-dir: every test image painted (mmseg's hook alone would draw every 50th)
    assert len(list((tmp_path / 'show' / 'vis_data' / 'vis_image').glob('*.png'))) == 2
    (run_dir,) = [d for d in (tmp_path / 'work_dirs' / config.stem).iterdir() if d.is_dir()]
    metrics = json.loads((run_dir / f'{run_dir.name}.json').read_text())
    assert 'mIoU' in metrics


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_missing_config_is_one_line_error(tool, tmp_path):
    args = ['python', REPO / f'tools/{tool}.py', tmp_path / 'nope.py']
    if tool == 'test':
        args.append(tmp_path / 'nope.pth')
    proc = run(*args)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert 'config file not found' in line and 'nope.py' in line


def test_test_tool_missing_or_corrupt_checkpoint_is_one_line_error(tmp_path):
    config = tmp_path / 'tiny.py'
    config.write_text(TINY_CONFIG.read_text())
    proc = run('python', REPO / 'tools/test.py', config, tmp_path / 'missing.pth')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert 'checkpoint file not found' in line and 'missing.pth' in line

    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'PK\x03\x04 this is not a checkpoint')
    proc = run('python', REPO / 'tools/test.py', config, corrupt)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'corrupt.pth' in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_unknown_type_is_one_line_error_with_close_matches(tool, tmp_path, shapes_root):
    config = tmp_path / 'typo.py'
    config.write_text(TINY_CONFIG.read_text().replace("type='ResNetV1c'", "type='ResNetV1x'"))
    args = ['python', REPO / f'tools/{tool}.py', config]
    if tool == 'test':
        checkpoint = tmp_path / 'any.pth'
        torch.save({'state_dict': {}}, checkpoint)
        args.append(checkpoint)
    proc = run(*args, '--work-dir', tmp_path / 'w', '--cfg-options', *data_options(shapes_root))
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "unknown type 'ResNetV1x'" in line and 'Did you mean' in line and 'ResNetV1c' in line


def test_resume_from_missing_file_is_one_line_error(tmp_path):
    config = tmp_path / 'tiny.py'
    config.write_text(TINY_CONFIG.read_text())
    proc = run('python', REPO / 'tools/train.py', config, '--resume', tmp_path / 'gone.pth')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert 'gone.pth' in line and '--resume' in line


@pytest.mark.parametrize('script', ['dist_train.sh', 'dist_test.sh'])
def test_dist_scripts_launch_torchrun_with_mmseg_env(script, tmp_path):
    # A stand-in torchrun records its arguments: no process group is started.
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    fake = bin_dir / 'torchrun'
    fake.write_text('#!/bin/sh\necho "$PYTHONPATH" > "$RECORD"\necho "$@" >> "$RECORD"\n')
    fake.chmod(0o755)
    record = tmp_path / 'record.txt'
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', RECORD=str(record))
    env.update(NNODES='2', NODE_RANK='1', PORT='29555', MASTER_ADDR='10.0.0.7')
    positional = ['cfg.py', '4'] if script == 'dist_train.sh' else ['cfg.py', 'ckpt.pth', '4']
    proc = run('bash', REPO / 'tools' / script, *positional, '--cfg-options', 'a=1', env=env)
    assert proc.returncode == 0, proc.stderr
    pythonpath, argv = record.read_text().splitlines()
    assert Path(pythonpath.split(':')[0]).resolve() == REPO
    args = argv.split()
    for flag in (
        '--nnodes=2',
        '--node_rank=1',
        '--master_addr=10.0.0.7',
        '--master_port=29555',
        '--nproc_per_node=4',
    ):
        assert flag in args
    tool = 'train.py' if script == 'dist_train.sh' else 'test.py'
    i = next(i for i, a in enumerate(args) if a.endswith(f'tools/{tool}'))
    assert args[i + 1 :] == [*positional[:-1], '--launcher', 'pytorch', '--cfg-options', 'a=1']
