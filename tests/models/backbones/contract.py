"""The dense-backbone contract, checked the same way for every family.

A family's test module calls :func:`check_backbone_contract` with a factory of a *tiny* instance;
the factory forwards the contract keyword arguments (``out_indices``, ``frozen_stages``,
``norm_eval``, ``with_cp``, ``drop_path_rate``) to the backbone's constructor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effvision.models.backbones.base import DenseBackbone

Factory = Callable[..., DenseBackbone]


def _spatial_ok(out: torch.Tensor, size: tuple[int, int], stride: int) -> bool:
    """Output side is the input side over the stride, rounded either way (family policy)."""
    return all(
        n in (math.floor(s / stride), math.ceil(s / stride))
        for n, s in zip(out.shape[-2:], size, strict=True)
    )


def check_outputs(
    model: DenseBackbone, strides: Sequence[int], sizes: Sequence[tuple[int, int]]
) -> None:
    """Outputs agree with ``feature_info``/``num_features`` and the strides at every size."""
    model.eval()
    assert len(model.feature_info) == len(model.out_indices)
    for info, i in zip(model.feature_info, model.out_indices, strict=True):
        assert info['num_chs'] == model.num_features[i]
        assert info['reduction'] == strides[i]
    for size in sizes:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            outs = model(x)
        assert isinstance(outs, tuple) and len(outs) == len(model.out_indices)
        for out, info in zip(outs, model.feature_info, strict=True):
            assert out.dim() == 4 and out.shape[:2] == (2, info['num_chs']), (size, out.shape)
            assert _spatial_ok(out, size, info['reduction']), (size, info, out.shape)
            assert torch.isfinite(out).all()


def check_frozen_stages(make: Factory, num_stages: int) -> None:
    """Frozen modules keep requires_grad False and eval mode through ``train()``."""
    for frozen in range(-1, num_stages + 1):
        model = make(frozen_stages=frozen)
        model.train()
        if frozen < 0:
            assert all(p.requires_grad for p in model.parameters())
            continue
        modules = model.frozen_modules()
        assert modules, 'frozen_stages >= 0 must freeze at least the stem'
        frozen_params = {id(p) for m in modules for p in m.parameters()}
        for name, param in model.named_parameters():
            assert param.requires_grad == (id(param) not in frozen_params), (frozen, name)
        for module in modules:
            assert all(not m.training for m in module.modules()), (frozen, module)
        if frozen < num_stages:
            assert any(p.requires_grad for p in model.parameters()), frozen


def check_norm_eval(make: Factory) -> None:
    model = make(norm_eval=True)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert all(not m.training for m in norms)
    assert any(m.training for m in model.modules() if not isinstance(m, _BatchNorm))
    if norms:  # without norm_eval they train
        model = make(norm_eval=False)
        model.train()
        assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))


def check_with_cp(make: Factory, size: tuple[int, int]) -> None:
    """Gradient checkpointing changes memory, not results or gradients."""
    torch.manual_seed(0)
    plain = make(with_cp=False, drop_path_rate=0.0)
    checkpointed = make(with_cp=True, drop_path_rate=0.0)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, *size)
    results = []
    for model in (plain, checkpointed):
        model.train()
        outs = model(x)
        loss = sum((o.double() ** 2).mean() for o in outs)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in outs], grads))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def check_every_parameter_is_used(make: Factory, size: tuple[int, int]) -> None:
    """A backward pass reaches every trainable parameter (no dead weights)."""
    model = make()
    model.train()
    outs = model(torch.randn(2, 3, *size))
    sum(o.float().mean() for o in outs).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f'parameters without gradient: {unused[:10]}'


def check_drop_path(make: Factory, size: tuple[int, int]) -> None:
    """drop_path_rate reaches the blocks: training outputs vary, eval outputs do not."""
    model = make(drop_path_rate=0.5)
    x = torch.randn(2, 3, *size)
    model.train()
    with torch.no_grad():
        a, b = model(x)[-1], model(x)[-1]
    assert not torch.equal(a, b), 'drop_path_rate has no effect in training'
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[-1], model(x)[-1])


def check_backbone_contract(
    make: Factory,
    *,
    strides: Sequence[int] = (4, 8, 16, 32),
    sizes: Sequence[tuple[int, int]] = ((64, 64), (61, 47)),
) -> None:
    """Run every contract check on the backbone built by ``make(**contract_kwargs)``.

    Args:
        make: Builds a tiny instance; must forward ``out_indices``, ``frozen_stages``,
            ``norm_eval``, ``with_cp`` and ``drop_path_rate`` to the constructor.
        strides: Output stride of each stage.
        sizes: Input sizes (H, W) to run, including sizes no window/patch divides.
    """
    model = make()
    assert isinstance(model, DenseBackbone) and isinstance(model, nn.Module)
    num_stages = model.num_stages
    assert len(model.num_features) == num_stages == len(strides)
    check_outputs(model, strides, sizes)
    last = num_stages - 1
    check_outputs(make(out_indices=(1, last)), strides, sizes[:1])
    check_outputs(make(out_indices=(-1,)), strides, sizes[:1])
    check_frozen_stages(make, num_stages)
    check_norm_eval(make)
    check_with_cp(make, sizes[-1])
    check_every_parameter_is_used(make, sizes[0])
    check_drop_path(make, sizes[0])
