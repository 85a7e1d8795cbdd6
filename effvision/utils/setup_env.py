"""Registration of effvision's modules and the default scope."""

from __future__ import annotations

import importlib

from .checkpoint import allow_mmengine_checkpoints


def register_all_modules(init_default_scope: bool = True) -> None:
    """Import every module that registers into effvision's (and mmseg's) registries.

    Args:
        init_default_scope: Also make ``effvision`` the current default scope, so that plain type
            names resolve from effvision's registries and fall back to mmseg's and mmengine's.
    """
    from mmseg.utils import register_all_modules as register_mmseg_modules

    register_mmseg_modules(init_default_scope=False)
    for module in (
        'effvision.models',
        'effvision.datasets',
        'effvision.engine',
        'effvision.evaluation',
        'effvision.visualization',
    ):
        importlib.import_module(module)
    allow_mmengine_checkpoints()
    if init_default_scope:
        from mmengine.registry import init_default_scope as set_default_scope

        set_default_scope('effvision')
