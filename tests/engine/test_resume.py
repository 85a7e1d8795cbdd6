"""Resuming a run on torch >= 2.6 with weights_only loading: counters, optimizer and schedule
continue where the checkpoint left them."""

from __future__ import annotations

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from effvision.utils import register_all_modules
from tests.conftest import TINY_CONFIG


def _cfg(work_dir, shapes_root, max_iters: int) -> Config:
    cfg = Config.fromfile(TINY_CONFIG)
    cfg.work_dir = str(work_dir)
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = str(shapes_root)
    cfg.optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3))
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4),
        dict(type='PolyLR', power=1.0, begin=4, end=9, by_epoch=False),
    ]
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=100)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=3)
    cfg.default_hooks.logger.interval = 1
    return cfg


def _adam_steps(runner: Runner) -> set[float]:
    return {float(s['step']) for s in runner.optim_wrapper.optimizer.state.values()}


def test_resume_continues_iterations_optimizer_and_schedule(tmp_path, shapes_root):
    register_all_modules()
    first = Runner.from_cfg(_cfg(tmp_path / 'run', shapes_root, max_iters=6))
    first.train()
    assert (tmp_path / 'run' / 'iter_6.pth').is_file()
    lr_at_6 = first.optim_wrapper.get_lr()['lr'][0]

    # a new process would start here: the checkpoint holds mmengine's HistoryBuffer & numpy
    resumed_cfg = _cfg(tmp_path / 'run', shapes_root, max_iters=9)
    resumed_cfg.resume = True
    resumed_cfg.load_from = str(tmp_path / 'run' / 'iter_6.pth')
    resumed = Runner.from_cfg(resumed_cfg)
    first_iter = _FirstIteration()
    resumed.register_hook(first_iter)
    resumed.train()
    state = first_iter.state
    assert state['iter'] == 6
    assert state['adam_steps'] == {6.0}
    assert state['lr'] == lr_at_6
    for key, value in first.model.state_dict().items():
        assert torch.equal(state['weights'][key], value), key
    assert resumed.iter == 9
    assert _adam_steps(resumed) == {9.0}
    assert resumed.optim_wrapper.get_lr()['lr'][0] < lr_at_6  # the poly decay went on


class _FirstIteration(Hook):
    """Records the runner's state when the first iteration after resuming starts."""

    def __init__(self):
        self.state = None

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if self.state is None:
            self.state = dict(
                iter=runner.iter,
                adam_steps=_adam_steps(runner),
                lr=runner.optim_wrapper.get_lr()['lr'][0],
                weights={k: v.clone() for k, v in runner.model.state_dict().items()},
            )
