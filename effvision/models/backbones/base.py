"""What every effvision backbone shares: the dense-prediction contract and checkpoint loading.

A backbone family subclasses :class:`DenseBackbone` and provides its blocks, its variants
(:attr:`DenseBackbone.arch_settings`), what ``frozen_stages`` freezes (:meth:`frozen_modules`),
its own random init (:meth:`init_random_weights`) and the conversion of the checkpoint formats it
meets in the wild (:meth:`convert_checkpoint`). The rest is here, written once:

* ``out_indices`` are normalised (negative indices allowed) and checked;
* ``frozen_stages`` follows mmseg: -1 freezes nothing, 0 the stem, k >= 1 the stem and stages
  0..k-1 with their output norms; frozen modules stay in eval mode through ``train()``;
* ``norm_eval`` keeps every BatchNorm in eval mode while training (frozen running statistics, as
  detection recipes with small per-GPU batches want);
* ``init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix=None)`` loads any supported format,
  converted on the fly, and reports what did not load instead of leaving random weights silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effvision.utils.checkpoint import (
    CheckpointError,
    describe_key_mismatch,
    extract_state_dict,
    load_checkpoint_file,
)

__all__ = ['DenseBackbone', 'normalize_out_indices', 'registered_backbones']


def normalize_out_indices(out_indices: Sequence[int], num_stages: int) -> tuple[int, ...]:
    """Map negative stage indices to positive ones and check the range and order."""
    normalized = []
    for i in out_indices:
        if not -num_stages <= i < num_stages:
            raise ValueError(
                f'out_indices {tuple(out_indices)} out of range for {num_stages} stages; '
                f'use indices in [0, {num_stages - 1}] (or negative ones counted from the end)'
            )
        normalized.append(i % num_stages)
    if len(set(normalized)) != len(normalized) or normalized != sorted(normalized):
        raise ValueError(f'out_indices {tuple(out_indices)} must be increasing and distinct')
    return tuple(normalized)


class DenseBackbone(BaseModule):
    """Base class of effvision backbones: multi-scale NCHW features for dense heads.

    Subclasses set ``arch_settings``, build their layers in ``__init__`` (after calling this one),
    set ``num_features`` and ``feature_info``, override :meth:`init_random_weights` and
    :meth:`convert_checkpoint` (and :meth:`frozen_modules` unless they have ``stem``, ``stages``
    and ``norm{i}``), and call :meth:`_freeze_stages` at the end of their ``__init__``.

    Args:
        num_stages: Number of stages of the network.
        out_indices: Stages whose outputs ``forward`` returns.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; k >= 1 also stages 0..k-1.
        norm_eval: Keep BatchNorm layers in eval mode during training.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH, prefix=None)`` to load weights, or
            None for the family's random init.
    """

    #: Published variants: name -> constructor keyword arguments.
    arch_settings: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Attribute holding the stem (what ``frozen_stages=0`` freezes).
    stem_name: ClassVar[str] = 'stem'

    def __init__(
        self,
        *,
        num_stages: int,
        out_indices: Sequence[int],
        frozen_stages: int,
        norm_eval: bool,
        init_cfg: dict | list[dict] | None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if frozen_stages < -1 or frozen_stages > num_stages:
            raise ValueError(
                f'frozen_stages={frozen_stages} must be in [-1, {num_stages}] '
                '(-1 nothing, 0 the stem, k the stem and the first k stages)'
            )
        self.num_stages = num_stages
        self.out_indices = normalize_out_indices(out_indices, num_stages)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.num_features: list[int] = []
        self.feature_info: list[dict[str, Any]] = []

    # -- variants ------------------------------------------------------------------------------
    @classmethod
    def resolve_arch(cls, arch: str | None, **overrides: Any) -> dict[str, Any]:
        """The settings of ``arch`` with every non-None override applied.

        Args:
            arch: A key of :attr:`arch_settings`, or None when every setting is given explicitly.
            **overrides: Settings; None means "take the arch's".

        Raises:
            ValueError: Unknown arch, or a setting neither the arch nor the overrides give.
        """
        if arch is not None and arch not in cls.arch_settings:
            raise ValueError(
                f'unknown {cls.__name__} arch {arch!r}; choose one of {sorted(cls.arch_settings)}'
                ' or pass arch=None with every setting explicitly'
            )
        settings = dict(cls.arch_settings[arch]) if arch is not None else {}
        for key, value in overrides.items():
            if value is not None:
                settings[key] = value
            elif key not in settings:
                raise ValueError(f'{cls.__name__}(arch={arch!r}) needs {key}')
        return settings

    # -- freezing --------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Modules ``frozen_stages`` freezes: the stem for 0; for k >= 1 also ``stages[:k]`` and
        their output norms ``norm{i}``. Families laid out otherwise override this."""
        frozen: list[nn.Module] = [getattr(self, self.stem_name)]
        for i in range(min(self.frozen_stages, len(self.stages))):
            frozen.append(self.stages[i])
            if hasattr(self, f'norm{i}'):
                frozen.append(getattr(self, f'norm{i}'))
        return frozen

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        for module in self.frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> DenseBackbone:
        """Set the training mode, keeping frozen stages (and BatchNorms with norm_eval) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    # -- weights ---------------------------------------------------------------------------------
    def init_random_weights(self) -> None:
        """The family's own random initialisation."""
        raise NotImplementedError(f'{type(self).__name__} must define its random init')

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert a state dict of any supported format to this model's keys (ours unchanged)."""
        return dict(state)

    def init_weights(self) -> None:
        """The family's random init, or load ``init_cfg.checkpoint`` converting its format."""
        cfg = self.init_cfg
        if isinstance(cfg, Mapping) and cfg.get('type') == 'Pretrained':
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
        else:
            self.init_random_weights()
        self._is_init = True

    def load_pretrained(self, checkpoint: str, prefix: str | None = None) -> None:
        """Load a checkpoint file of any supported format (see :meth:`convert_checkpoint`).

        Missing keys (e.g. per-output norms absent from classification checkpoints) and unexpected
        keys (e.g. a classifier head) are reported with counts and examples; keys whose shapes do
        not fit raise, since loading them would silently leave random weights.

        Raises:
            CheckpointError: The file cannot be read, no key matches, or shapes do not fit.
        """
        name = type(self).__name__
        state = extract_state_dict(load_checkpoint_file(checkpoint))
        if prefix:
            prefix = prefix if prefix.endswith('.') else prefix + '.'
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise CheckpointError(f'no key of {checkpoint} starts with prefix {prefix!r}')
        state = self.convert_checkpoint(state)
        own = self.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise CheckpointError(
                f'{checkpoint} does not fit this {name}: '
                + describe_key_mismatch(
                    (),
                    (),
                    [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in mismatched],
                )
                + '. Pick the arch (and window/stripe settings) the checkpoint was trained with.'
            )
        result = self.load_state_dict(state, strict=False)
        matched = len(own) - len(result.missing_keys)
        if matched == 0:
            raise CheckpointError(
                f'no key of {checkpoint} matches this {name}: '
                + describe_key_mismatch(result.missing_keys, result.unexpected_keys)
            )
        level = logging.WARNING if result.missing_keys or result.unexpected_keys else logging.INFO
        print_log(
            f'{name}: loaded {matched}/{len(own)} tensors from {checkpoint}; '
            + describe_key_mismatch(result.missing_keys, result.unexpected_keys),
            logger='current',
            level=level,
        )


def registered_backbones() -> list[type[DenseBackbone]]:
    """Every registered effvision backbone class with published variants, sorted by name."""
    from effvision.registry import MODELS
    from effvision.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    classes = {cls for cls in MODELS.module_dict.values() if isinstance(cls, type)}
    found = [c for c in classes if issubclass(c, DenseBackbone) and c.arch_settings]
    return sorted(found, key=lambda c: c.__name__)
