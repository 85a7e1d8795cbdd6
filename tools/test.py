"""Test (and evaluate) a segmentor: mmsegmentation 1.x's ``tools/test.py`` with effvision's fixes.

Same flags and semantics as mmseg 1.2.2:

* ``--out DIR`` writes one ``<image stem>.png`` label map per test image (the evaluator's
  ``output_dir``), as mmseg does; it is a directory, not mmdet's pickle file.
* ``--show`` / ``--show-dir DIR`` turn on drawing in the ``visualization`` hook; with ``--show-dir``
  the drawn images land in ``DIR/vis_data/vis_image/``.
* ``--tta`` swaps in the config's ``tta_pipeline`` and wraps the model in its ``tta_model``.

Besides, checkpoints written by mmengine load on torch >= 2.6 with ``weights_only`` kept on, and a
missing config or checkpoint is reported in one line before the runner is built.

Example::

    python tools/test.py CONFIG work_dirs/<stem>/iter_2000.pth --out work_dirs/<stem>/preds
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import NoReturn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (mmseg 1.2.2's flags)."""
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description='Test (and eval) a segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='if specified, the evaluation metric results will be dumped into the directory as '
        'json',
    )
    parser.add_argument(
        '--out',
        type=str,
        help='the directory to save the predicted label maps (one <image stem>.png per image)',
    )
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved; if specified, the images are saved '
        'under DIR/vis_data/vis_image/ (every image, unless the visualization hook of the '
        'config sets an interval)',
    )
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s), 0 is block'
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
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    # torch.distributed launchers >= 2.0 pass `--local-rank`; older ones `--local_rank`.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _fail(message: str) -> NoReturn:
    """Exits with one line on stderr and status 1 (no traceback: the message says what to do)."""
    sys.exit(f'test.py: error: {message}')


def trigger_visualization_hook(cfg, args: argparse.Namespace):
    """Makes the ``visualization`` default hook draw (and show / save) test predictions."""
    default_hooks = cfg.get('default_hooks', None) or {}
    if 'visualization' not in default_hooks:
        _fail(
            '--show/--show-dir need a `visualization` entry in default_hooks; add '
            "default_hooks.visualization=dict(type='SegVisualizationHook') to the config."
        )
    hook = default_hooks['visualization']
    hook['draw'] = True
    # SegVisualizationHook draws every 50th image by default, so a short test run drew nothing;
    # asking to see or save the predictions means all of them unless the config says otherwise.
    hook.setdefault('interval', 1)
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        cfg.visualizer['save_dir'] = args.show_dir
    return cfg


def _set_output_dir(evaluator, out_dir: str) -> None:
    """Points the evaluator's metric(s) at ``out_dir`` (IoUMetric writes label PNGs there)."""
    metrics = evaluator if isinstance(evaluator, list) else [evaluator]
    if isinstance(evaluator, dict) and 'metrics' in evaluator:  # an `Evaluator` wrapper dict
        metrics = evaluator['metrics']
        metrics = metrics if isinstance(metrics, list) else [metrics]
    for metric in metrics:
        metric['output_dir'] = out_dir
        # mmseg's test.py sets it too; IoUMetric swallows it. Kept for metrics that use it.
        metric['keep_results'] = True


def main(argv: list[str] | None = None) -> None:
    """Builds the runner from the config and the command line, then runs the test loop."""
    args = parse_args(argv)
    if not osp.isfile(args.config):
        _fail(f'config file not found: {args.config!r}; pass the path of an existing config file.')
    if not osp.isfile(args.checkpoint):
        _fail(
            f'checkpoint file not found: {args.checkpoint!r}; pass the .pth written by '
            'tools/train.py (e.g. work_dirs/<config stem>/iter_N.pth).'
        )

    from effvision.utils.checkpoint import allow_mmengine_checkpoints, load_checkpoint_file

    # Resuming and `load_from` go through mmengine's torch.load without `weights_only`.
    allow_mmengine_checkpoints()
    # Fail on a corrupt or foreign file now, in one line, rather than deep inside the runner.
    try:
        load_checkpoint_file(args.checkpoint)
    except (OSError, RuntimeError, ValueError) as err:
        _fail(str(err).splitlines()[0] if str(err) else repr(err))

    from mmengine.config import Config
    from mmengine.runner import Runner

    from effvision.registry import RUNNERS
    from effvision.utils import explain_unknown_type, register_all_modules

    register_all_modules(init_default_scope=True)

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir priority: CLI > config > ./work_dirs/<config stem> (mmseg's rule).
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)

    if args.tta:
        if 'tta_pipeline' not in cfg or 'tta_model' not in cfg:
            _fail(
                '--tta needs `tta_pipeline` and `tta_model` in the config (mmseg defines them in '
                'its dataset and default_runtime bases); add them or drop --tta.'
            )
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model

    if args.out is not None:
        _set_output_dir(cfg.test_evaluator, args.out)

    try:
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        runner.test()
    except KeyError as err:
        # mmengine's "X is not in the S::N registry": say which names are close instead
        message = explain_unknown_type(err)
        if message is None:
            raise
        _fail(message)


if __name__ == '__main__':
    main()
