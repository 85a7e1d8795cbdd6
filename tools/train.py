"""Train a segmentor: mmsegmentation 1.x's ``tools/train.py`` with effvision's fixes.

Same flags and the same ``work_dirs/<config stem>`` layout as mmseg, plus:

* ``--resume [PATH]`` (as in mmdet): bare ``--resume`` resumes from the latest checkpoint recorded
  in the work dir, ``--resume PATH`` from that file (mmseg's flag cannot take a path).
* resuming works on torch >= 2.6: mmengine's own checkpoint objects are allowlisted for
  ``weights_only`` loading instead of switching the safety off.
* a missing config or resume file is reported in one line before anything heavy is imported.

Examples::

    python tools/train.py configs/quickstart/upernet_swin-nano_1xb8-800_shapes-128x128.py
    python tools/train.py CONFIG --resume                      # latest in the work dir
    python tools/train.py CONFIG --resume work_dirs/x/iter_1000.pth
    python tools/train.py CONFIG --cfg-options train_cfg.max_iters=200 --amp
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import NoReturn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (mmseg 1.2.2's flags; ``--resume`` as in mmdet 3.x)."""
    # DictAction is tiny; importing it here keeps `--help` and path errors fast enough.
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description='Train a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume training: without a value, from the latest checkpoint in the work dir; '
        'with a path, from that checkpoint',
    )
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair in xxx=yyy format '
        'will be merged into config file. If the value to be overwritten is a list, it should '
        'be like key="[a,b]" or key=a,b. It also allows nested list/tuple values, e.g. '
        'key="[(a,b),(c,d)]". Note that the quotation marks are necessary and that no white '
        'space is allowed.',
    )
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher',
    )
    # torch.distributed launchers >= 2.0 pass `--local-rank`; older ones `--local_rank`.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _fail(message: str) -> NoReturn:
    """Exits with one line on stderr and status 1 (no traceback: the message says what to do)."""
    sys.exit(f'train.py: error: {message}')


def main(argv: list[str] | None = None) -> None:
    """Builds the runner from the config and the command line, then trains."""
    args = parse_args(argv)
    if not osp.isfile(args.config):
        _fail(f'config file not found: {args.config!r}; pass the path of an existing config file.')
    if args.resume not in (None, 'auto') and not osp.isfile(args.resume):
        _fail(
            f'checkpoint to resume from not found: {args.resume!r}; pass an existing .pth file, '
            'or `--resume` alone to resume from the latest checkpoint in the work dir.'
        )

    from mmengine.config import Config
    from mmengine.logging import print_log
    from mmengine.runner import Runner

    from effvision.registry import RUNNERS
    from effvision.utils import explain_unknown_type, register_all_modules
    from effvision.utils.checkpoint import allow_mmengine_checkpoints

    register_all_modules(init_default_scope=True)
    # Resuming and `load_from` go through mmengine's torch.load without `weights_only`.
    allow_mmengine_checkpoints()

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir priority: CLI > config > ./work_dirs/<config stem> (mmseg's rule).
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_wrapper == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in your config.', logger='current')
        elif optim_wrapper == 'OptimWrapper':
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        else:
            _fail(
                f'--amp needs optim_wrapper.type OptimWrapper or AmpOptimWrapper, the config has '
                f'{optim_wrapper!r}; drop --amp or change optim_wrapper.type.'
            )

    if args.resume == 'auto':
        # mmengine finds the checkpoint named in <work_dir>/last_checkpoint.
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    try:
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        runner.train()
    except KeyError as err:
        # mmengine's "X is not in the S::N registry": say which names are close instead
        message = explain_unknown_type(err)
        if message is None:
            raise
        _fail(message)


if __name__ == '__main__':
    main()
