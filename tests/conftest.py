"""Shared test fixtures: golden fixtures, markers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = REPO_ROOT.parent / 'shared' / 'golden'


def golden_dir(model: str) -> Path:
    """The golden fixture folder of ``model``; skips (or fails in CI) when it is absent."""
    folder = GOLDEN_ROOT / model
    if not folder.is_dir():
        reason = f'golden fixtures not found at {folder} (clone the repo next to shared/)'
        if os.environ.get('EFFVISION_REQUIRE_GOLDEN') == '1':
            pytest.fail(reason + '; EFFVISION_REQUIRE_GOLDEN=1 forbids skipping')
        pytest.skip(reason)
    return folder


def load_golden(model: str, case: str) -> dict:
    return torch.load(golden_dir(model) / f'{case}.pt', weights_only=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip_gpu)


def require_ops(op: str) -> None:
    """Skip when ``op``'s compiled kernels are not built; CI (EFFVISION_REQUIRE_OPS=1) fails."""
    from effvision.ops import _ext

    if _ext.load(op) is None:
        reason = f'effvision.ops._{op} is not built (make install)'
        if os.environ.get('EFFVISION_REQUIRE_OPS') == '1':
            pytest.fail(reason + '; EFFVISION_REQUIRE_OPS=1 forbids skipping')
        pytest.skip(reason)


@pytest.fixture(params=['fused', 'reference'])
def ops_path(request):
    """Runs a test through the compiled kernels (CPU) and again through the PyTorch references."""
    from effvision.ops import _ext

    if request.param == 'reference':
        with _ext.reference_ops():
            yield request.param
        return
    for op in ('window_attention', 'routing_attention'):
        require_ops(op)
    yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def shapes_root(tmp_path_factory) -> Path:
    """A small synthetic shapes set (8 train / 4 val at 64x64), generated once per session."""
    from effvision.datasets.synthetic import generate_shapes

    root = tmp_path_factory.mktemp('data') / 'shapes'
    generate_shapes(root, num_train=8, num_val=4, size=(64, 64), seed=0)
    return root


CONFIGS = sorted(p for p in (REPO_ROOT / 'configs').rglob('*.py') if '_base_' not in p.parts)
# Backbone variants whose configs run in every CI run; a config of another variant of the same
# backbone repeats one of these recipes at other widths/depths and runs in `make test-all` (slow),
# which keeps `make test` near its time budget. Every config of the heads and of the demos (the
# narrow 'nano' Swin) runs.
CI_VARIANTS = {
    'swin': {'t', 'nano'}, 'cswin': {'t'}, 'nextvit': {'s'}, 'efficientformer': {'l1'},
    'efficientformerv2': {'s0'}, 'biformer': {'s'}, 'moat': {'0'},
}  # fmt: skip


def config_variant(path: Path) -> tuple[str | None, str | None]:
    """(backbone family, variant) named in a config file name, e.g. ('swin', 't')."""
    match = re.search(r'_([a-z0-9]+)-([a-z0-9]+)_', path.name)
    return match.groups() if match else (None, None)


def config_param(path: Path, ci: bool | None = None):
    """A config as a test parameter, marked slow unless it runs in CI.

    Args:
        path: The config file.
        ci: Whether it runs in CI; default: unless it is a non-CI variant of a backbone family.
    """
    if ci is None:
        family, variant = config_variant(path)
        ci = family not in CI_VARIANTS or variant in CI_VARIANTS[family]
    return path if ci else pytest.param(path, marks=pytest.mark.slow)


QUICKSTART = REPO_ROOT / 'configs/quickstart/upernet_swin-nano_1xb8-800_shapes-128x128.py'
TINY_CONFIG = REPO_ROOT / 'tests/data/tiny_fcn-r18_1xb2_shapes-64x64.py'


def data_options(root: Path) -> list[str]:
    """--cfg-options pointing every dataloader of a config at the shapes set in ``root``."""
    return [f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val', 'test')]


@pytest.fixture(scope='module')
def checkpoint(config, tmp_path_factory) -> Path:
    """Random weights of the module's ``config`` model, saved as tools/train.py would (with
    dataset_meta). ``config`` is the fixture of the requesting test module."""
    from effvision.apis import init_model

    model = init_model(config)
    path = tmp_path_factory.mktemp('ckpt') / 'model.pth'
    torch.save(
        {'state_dict': model.state_dict(), 'meta': {'dataset_meta': model.dataset_meta}}, path
    )
    return path
