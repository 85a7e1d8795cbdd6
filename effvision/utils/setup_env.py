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
        from mmengine.registry import DefaultScope

        # A scope of the same name may already exist (e.g. created by a Runner); make ours current.
        if DefaultScope.get_current_instance() is None or not DefaultScope.check_instance_created(
            'effvision'
        ):
            DefaultScope.get_instance('effvision', scope_name='effvision')
        else:
            DefaultScope._instance_dict.move_to_end('effvision')  # type: ignore[attr-defined]
