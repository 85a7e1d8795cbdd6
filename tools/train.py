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
import os.path as osp

from effvision.cli import (
    add_runner_arguments,
    fail,
    load_runner_config,
    parse_runner_args,
    require_config,
    run,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (mmseg 1.2.2's flags; ``--resume`` as in mmdet 3.x)."""
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
    add_runner_arguments(parser)
    return parse_runner_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    """Builds the runner from the config and the command line, then trains."""
    args = parse_args(argv)
    require_config('train.py', args.config)
    if args.resume not in (None, 'auto') and not osp.isfile(args.resume):
        fail(
            'train.py',
            f'checkpoint to resume from not found: {args.resume!r}; pass an existing .pth file, '
            'or `--resume` alone to resume from the latest checkpoint in the work dir.',
        )
    from mmengine.logging import print_log

    cfg = load_runner_config(args)

    if args.amp:
        optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_wrapper == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in your config.', logger='current')
        elif optim_wrapper == 'OptimWrapper':
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        else:
            fail(
                'train.py',
                f'--amp needs optim_wrapper.type OptimWrapper or AmpOptimWrapper, the config has '
                f'{optim_wrapper!r}; drop --amp or change optim_wrapper.type.',
            )

    if args.resume == 'auto':
        # mmengine finds the checkpoint named in <work_dir>/last_checkpoint.
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    run('train.py', cfg, 'train')


if __name__ == '__main__':
    main()
