"""Test (and evaluate) a segmentor: mmsegmentation 1.x's ``tools/test.py`` with effvision's fixes.

Same flags and semantics as mmseg 1.2.2:

* ``--out DIR`` writes one ``<image stem>.png`` label map per test image (the evaluator's
  ``output_dir``), as mmseg does; it is a directory, not mmdet's pickle file.
* ``--show`` / ``--show-dir DIR`` turn on drawing in the ``visualization`` hook; with ``--show-dir``
  the drawn images land in ``DIR/vis_data/vis_image/``.
* ``--tta`` swaps in the config's ``tta_pipeline`` and wraps the model in its ``tta_model``.

``--backend onnxruntime`` (or ``tensorrt``) evaluates an exported model instead: the second
argument is then the folder written by ``tools/deploy.py`` (``end2end.onnx`` or
``end2end.engine`` + ``deploy.json``), and the config's
data pipeline, preprocessing, whole/slide inference, post-processing and metric are used
unchanged (``effvision.deploy.DeployedSegmentor``), so the metric compares with PyTorch's.
Panoptic kMaX-DeepLab / PEM configs run through ``effvision.deploy.DeployedPanopticSegmentor``
(the config's fusion head merges the exported logits: PQ and mIoU as with PyTorch); detection
configs (Mask R-CNN) have no exported form.

Besides, checkpoints written by mmengine load on torch >= 2.6 with ``weights_only`` kept on, and a
missing config or checkpoint is reported in one line before the runner is built.

Examples::

    python tools/test.py CONFIG work_dirs/<stem>/iter_2000.pth --out work_dirs/<stem>/preds
    python tools/deploy.py CONFIG work_dirs/<stem>/iter_2000.pth --out-dir D --dynamic 256 1024
    python tools/test.py CONFIG D --backend onnxruntime
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
    """Parses the command line (mmseg 1.2.2's flags)."""
    parser = argparse.ArgumentParser(description='Test (and eval) a segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument(
        'checkpoint',
        help='checkpoint file; with --backend onnxruntime/tensorrt, the folder tools/deploy.py '
        'wrote',
    )
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
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    parser.add_argument(
        '--backend',
        choices=('pytorch', 'onnxruntime', 'tensorrt'),
        default='pytorch',
        help='run the PyTorch checkpoint (default) or the exported model with onnxruntime or '
        'TensorRT (its end2end.engine, built by tools/deploy.py --backend tensorrt)',
    )
    add_runner_arguments(parser)
    return parse_runner_args(parser, argv)


def trigger_visualization_hook(cfg, args: argparse.Namespace):
    """Makes the ``visualization`` default hook draw (and show / save) test predictions."""
    default_hooks = cfg.get('default_hooks', None) or {}
    if 'visualization' not in default_hooks:
        fail(
            'test.py',
            '--show/--show-dir need a `visualization` entry in default_hooks; add '
            "default_hooks.visualization=dict(type='SegVisualizationHook') to the config.",
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


def use_exported_model(cfg, args: argparse.Namespace):
    """Swaps the config's model for the exported one in ``args.checkpoint`` (a folder)."""
    from effvision.deploy import DeployedModelError, deployed_model_cfg

    if args.tta:
        fail('test.py', f'--tta is not supported with --backend {args.backend}; drop --tta.')
    try:
        cfg.model = deployed_model_cfg(cfg.model, args.checkpoint, args.backend)
    except DeployedModelError as err:
        fail('test.py', str(err))
    cfg.load_from = None
    return cfg


def main(argv: list[str] | None = None) -> None:
    """Builds the runner from the config and the command line, then runs the test loop."""
    args = parse_args(argv)
    require_config('test.py', args.config)
    if args.backend != 'pytorch':
        cfg = use_exported_model(load_runner_config(args), args)
        if args.show or args.show_dir:
            cfg = trigger_visualization_hook(cfg, args)
        if args.out is not None:
            _set_output_dir(cfg.test_evaluator, args.out)
        from effvision.deploy import DeployedModelError

        try:
            run('test.py', cfg, 'test')
        except DeployedModelError as err:
            fail('test.py', str(err))
        return
    if not osp.isfile(args.checkpoint):
        fail(
            'test.py',
            f'checkpoint file not found: {args.checkpoint!r}; pass the .pth written by '
            'tools/train.py (e.g. work_dirs/<config stem>/iter_N.pth).',
        )
    from effvision.utils.checkpoint import CheckpointError, load_checkpoint_file

    # Fail on a corrupt or foreign file now, in one line, rather than deep inside the runner.
    try:
        load_checkpoint_file(args.checkpoint)
    except CheckpointError as err:
        fail('test.py', str(err))

    cfg = load_runner_config(args)
    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)

    if args.tta:
        if 'tta_pipeline' not in cfg or 'tta_model' not in cfg:
            fail(
                'test.py',
                '--tta needs `tta_pipeline` and `tta_model` in the config (mmseg defines them in '
                'its dataset and default_runtime bases); add them or drop --tta.',
            )
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model

    if args.out is not None:
        _set_output_dir(cfg.test_evaluator, args.out)

    run('test.py', cfg, 'test')


if __name__ == '__main__':
    main()
