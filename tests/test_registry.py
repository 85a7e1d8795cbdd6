"""effvision's registries: scope, parents, cross-package access and unknown-type messages."""

from __future__ import annotations

import mmdet.registry
import mmseg.registry
import pytest
from mmengine.registry import DefaultScope, Registry

import effvision.registry as ev_registry
from effvision.models.backbones import Swin
from effvision.utils import explain_unknown_type, register_all_modules

REGISTRIES = {
    k: v for k, v in vars(ev_registry).items() if isinstance(v, Registry) and v.scope == 'effvision'
}
SWIN_CFG = dict(arch=None, embed_dim=8, depths=(2, 2), num_heads=(1, 2), out_indices=(0, 1))


@pytest.mark.parametrize('name', sorted(REGISTRIES))
def test_every_registry_is_an_effvision_child_of_mmseg(name):
    registry = REGISTRIES[name]
    assert registry.scope == 'effvision'
    assert registry.parent is getattr(mmseg.registry, name)
    assert registry._locations, f'{name} has no locations: third-party registries need them'


def test_default_scope_resolves_ours_and_mmsegs():
    register_all_modules()
    assert DefaultScope.get_current_instance().scope_name == 'effvision'
    model = mmseg.registry.MODELS.build(
        dict(
            type='EncoderDecoder',
            backbone=dict(SWIN_CFG, type='Swin', out_indices=(1,)),
            decode_head=dict(type='FCNHead', in_channels=16, channels=8, num_classes=3),
        )
    )
    assert isinstance(model.backbone, Swin)


def test_mmdet_configs_reach_us_with_the_scope_prefix():
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = mmdet.registry.MODELS.build(dict(type='effvision.Swin', **SWIN_CFG))
    assert isinstance(model, Swin)


def test_no_upstream_name_is_shadowed():
    for name, registry in REGISTRIES.items():
        registry.import_from_location()
        for key in registry.module_dict:
            for parent_node in (registry.parent, registry.parent.parent):
                assert key not in parent_node.module_dict, f'{name}: {key} shadows an upstream name'


def test_unknown_type_names_registry_and_close_matches():
    register_all_modules()
    with pytest.raises(KeyError) as info:
        ev_registry.MODELS.build(dict(type='Swim', **SWIN_CFG))
    message = explain_unknown_type(info.value)
    assert "unknown type 'Swim'" in message
    assert 'effvision::model' in message
    assert 'Swin' in message.split('Did you mean:')[1]


def test_unknown_type_helper_ignores_other_errors():
    assert explain_unknown_type(KeyError('something else')) is None
