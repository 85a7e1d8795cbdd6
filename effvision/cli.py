"""Command-line plumbing shared by tools/train.py and tools/test.py.

Kept free of torch and mmseg imports at module level, so that a wrong path is reported in one line
before anything heavy loads.
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import NoReturn


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags mmseg's train.py and test.py share: ``--cfg-options``, ``--launcher``, rank."""
    from mmengine.config import DictAction

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


def parse_runner_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parses the command line and exports ``LOCAL_RANK`` as mmseg's tools do."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def fail(tool: str, message: str) -> NoReturn:
    """Exits with one line on stderr and status 1 (no traceback: the message says what to do)."""
    sys.exit(f'{tool}: error: {message}')


def require_config(tool: str, path: str) -> None:
    if not osp.isfile(path):
        fail(tool, f'config file not found: {path!r}; pass the path of an existing config file.')


def load_runner_config(args: argparse.Namespace):
    """Registers effvision's modules, loads ``args.config`` and applies the shared flags.

    ``work_dir`` priority is mmseg's: ``--work-dir`` > the config's > ``./work_dirs/<stem>``.
    """
    from mmengine.config import Config

    from effvision.utils import allow_mmengine_checkpoints, register_all_modules

    register_all_modules(init_default_scope=True)
    # `load_from` and resuming go through mmengine's torch.load without `weights_only`.
    allow_mmengine_checkpoints()
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def run(tool: str, cfg, loop: str) -> None:
    """Builds the runner and runs ``loop`` (``train`` or ``test``); unknown types get one line
    that names the registry and the closest registered names."""
    from mmengine.runner import Runner

    from effvision.registry import RUNNERS
    from effvision.utils import explain_unknown_type

    try:
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        getattr(runner, loop)()
    except KeyError as err:
        message = explain_unknown_type(err)
        if message is None:
            raise
        fail(tool, message)
