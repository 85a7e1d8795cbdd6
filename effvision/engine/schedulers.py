"""Learning-rate schedules of the official codes that mmengine's schedulers cannot express.

``DeepLabPolyLR`` is deeplab2's / kMaX-DeepLab's ``TF2WarmupPolyLR`` (bytedance/kmax-deeplab
``train_net_utils.py``): during the first ``warmup_iters`` iterations the learning rate is the
base rate times a linear warmup factor (``warmup_factor`` -> 1), and afterwards
``base * (1 - t / max_iters) ** power`` with ``t`` counted from iteration 0. mmengine's
``LinearLR`` + ``PolyLR`` either multiply the two during warmup (chained) or restart the poly
decay after it (``begin=warmup_iters``); both differ from the official curve.
"""

from __future__ import annotations

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import _ParamScheduler

from effvision.registry import PARAM_SCHEDULERS


class DeepLabPolyParamScheduler(_ParamScheduler):
    """Linear warmup, then a poly decay counted from iteration 0, in closed form.

    The value is computed from each group's initial value, not chained: use it alone for a
    parameter.

    Args:
        optimizer: Optimizer or optimizer wrapper.
        param_name: Parameter to schedule (``'lr'``).
        max_iters: Iteration at which the decay reaches 0.
        warmup_iters: Iterations of linear warmup (detectron2's ``WARMUP_ITERS``).
        warmup_factor: Factor at iteration 0 (detectron2's ``WARMUP_FACTOR``, 0.001).
        power: Exponent of the poly decay.
        begin: First iteration the scheduler acts on.
        end: Iteration after which it stops (default ``max_iters``).
        last_step: Resume index (mmengine convention).
        by_epoch: Must be False: the schedule is defined in iterations.
        verbose: Print each update.
    """

    def __init__(
        self,
        optimizer,
        param_name: str,
        *,
        max_iters: int,
        warmup_iters: int = 0,
        warmup_factor: float = 1e-3,
        power: float = 0.9,
        begin: int = 0,
        end: int | None = None,
        last_step: int = -1,
        by_epoch: bool = False,
        verbose: bool = False,
    ) -> None:
        if by_epoch:
            raise ValueError('DeepLabPolyLR is defined in iterations; set by_epoch=False')
        if max_iters <= 0 or not 0 <= warmup_iters <= max_iters:
            raise ValueError(
                f'need 0 <= warmup_iters <= max_iters and max_iters > 0, got '
                f'{warmup_iters=} {max_iters=}'
            )
        self.max_iters = max_iters
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.power = power
        super().__init__(
            optimizer,
            param_name=param_name,
            begin=begin,
            end=max_iters if end is None else end,
            last_step=last_step,
            by_epoch=False,
            verbose=verbose,
        )

    def factor(self, step: int) -> float:
        """The multiplier of the base value at iteration ``step``."""
        if step < self.warmup_iters:
            alpha = step / self.warmup_iters
            return self.warmup_factor * (1 - alpha) + alpha
        return max(0.0, 1 - step / self.max_iters) ** self.power

    def _get_value(self) -> list[float]:
        factor = self.factor(self.last_step)
        return [base * factor for base in self.base_values]


@PARAM_SCHEDULERS.register_module()
class DeepLabPolyLR(LRSchedulerMixin, DeepLabPolyParamScheduler):
    """:class:`DeepLabPolyParamScheduler` for the learning rate, e.g.::

    param_scheduler = [dict(type='DeepLabPolyLR', max_iters=150000, warmup_iters=5000)]
    """
