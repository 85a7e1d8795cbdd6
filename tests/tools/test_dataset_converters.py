"""tools/dataset_converters/{gta,synthia,class_stats}.py: label conversion and class statistics."""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from effvision.datasets.gta import GTA5_ID_TO_TRAIN_ID
from effvision.datasets.synthia import SYNTHIA_ID_TO_TRAIN_ID
from tests.conftest import REPO_ROOT

TOOLS = REPO_ROOT / 'tools' / 'dataset_converters'


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f'converter_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def every_id_map(values: np.ndarray, shape: tuple[int, int], shift: int) -> np.ndarray:
    """All ``values`` (rolled by ``shift``, so files differ), tiled to ``shape``."""
    return np.resize(np.roll(values, shift), shape)


@pytest.fixture
def gta_root(tmp_path) -> Path:
    root = tmp_path / 'gta'
    (root / 'labels').mkdir(parents=True)
    for i in range(3):
        ids = every_id_map(np.arange(256, dtype=np.uint8), (16, 32), 7 * i)
        image = Image.fromarray(ids).convert('P')
        image.putpalette([v for c in range(256) for v in (c, c, c)])
        image.save(root / 'labels' / f'{i:05d}.png')
    return root


@pytest.fixture
def synthia_root(tmp_path) -> Path:
    root = tmp_path / 'synthia'
    (root / 'GT/LABELS').mkdir(parents=True)
    for i in range(3):
        ids = every_id_map(np.arange(30, dtype=np.uint16), (8, 8), i)
        other = np.full_like(ids, 4000 + i)  # instance ids in the other channels: never read
        assert cv2.imwrite(str(root / f'GT/LABELS/{i:07d}.png'), np.dstack([other, other, ids]))
    return root


def check_conversion(root: Path, label_dir: str, read, table: dict[int, int], out: Path) -> None:
    originals = sorted(p for p in (root / label_dir).glob('*.png') if 'TrainIds' not in p.name)
    expected_stats = []
    for path in originals:
        ids = read(path)
        train_ids = np.asarray(Image.open(str(path)[:-4] + '_labelTrainIds.png'))
        expected = np.vectorize(lambda v: table.get(int(v), 255))(ids)
        assert train_ids.dtype == np.uint8 and np.array_equal(train_ids, expected)
        counts = {str(c): int((expected == c).sum()) for c in range(19) if (expected == c).any()}
        expected_stats.append({**counts, 'file': str(path)[:-4] + '_labelTrainIds.png'})
    assert json.loads((out / 'sample_class_stats.json').read_text()) == expected_stats
    with_class = json.loads((out / 'samples_with_class.json').read_text())
    assert list(with_class) == [str(c) for c in sorted(table.values())]
    for c, entries in with_class.items():
        assert entries == [[s['file'], s[c]] for s in expected_stats if c in s]


def test_gta_converter(gta_root, capsys):
    load_tool('gta').main([str(gta_root), '--nproc', '2'])
    assert 'converted 3 label maps' in capsys.readouterr().out
    check_conversion(
        gta_root, 'labels', lambda p: np.asarray(Image.open(p)), GTA5_ID_TO_TRAIN_ID, gta_root
    )


def test_synthia_converter(synthia_root, tmp_path):
    out = tmp_path / 'stats'
    load_tool('synthia').main([str(synthia_root), '--nproc', '1', '--out-dir', str(out)])
    check_conversion(
        synthia_root,
        'GT/LABELS',
        lambda p: cv2.imread(str(p), cv2.IMREAD_UNCHANGED)[:, :, 2],
        SYNTHIA_ID_TO_TRAIN_ID,
        out,
    )
    assert not (synthia_root / 'sample_class_stats.json').exists()


def test_converter_errors_are_messages(tmp_path):
    with pytest.raises(SystemExit, match='error: label folder .*labels does not exist'):
        load_tool('gta').main([str(tmp_path)])
    (tmp_path / 'GT/LABELS').mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / 'labels.png')
    with pytest.raises(SystemExit, match="error: no label map ending with '.png'"):
        load_tool('synthia').main([str(tmp_path)])


def test_class_stats_tool_on_the_shapes_set(shapes_root, tmp_path):
    out = tmp_path / 'out'
    load_tool('class_stats').main(
        [
            str(shapes_root),
            '--ann-dir',
            'annotations/training',
            '--suffix',
            '.png',
            '--out',
            str(out),
        ]
    )
    labels = sorted((shapes_root / 'annotations/training').glob('*.png'))
    stats = json.loads((out / 'sample_class_stats.json').read_text())
    assert [Path(s['file']).name for s in stats] == [p.name for p in labels]
    totals = {}
    for entry, path in zip(stats, labels):
        label = np.asarray(Image.open(path))
        ids, counts = np.unique(label[label != 255], return_counts=True)
        assert {k: v for k, v in entry.items() if k != 'file'} == {
            str(i): int(n) for i, n in zip(ids, counts)
        }
        for i, n in zip(ids, counts):
            totals[str(i)] = totals.get(str(i), 0) + int(n)
    with_class = json.loads((out / 'samples_with_class.json').read_text())
    assert {c: sum(n for _, n in entries) for c, entries in with_class.items()} == totals


def test_class_stats_tool_as_a_script(shapes_root, tmp_path, monkeypatch, capsys):
    # Run as `python tools/dataset_converters/class_stats.py ...` would, without a subprocess
    # (importing torch and mmseg again would take seconds).
    out = tmp_path / 'out'
    argv = [str(shapes_root), '--ann-dir', 'annotations/validation', '--suffix', '.png']
    monkeypatch.setattr(sys, 'argv', ['class_stats.py', *argv, '--out', str(out)])
    runpy.run_path(str(TOOLS / 'class_stats.py'), run_name='__main__')
    assert capsys.readouterr().out.startswith('4 label maps, classes [')
    assert len(json.loads((out / 'sample_class_stats.json').read_text())) == 4


def test_class_stats_tool_errors(tmp_path):
    with pytest.raises(SystemExit, match='error: label folder .*nowhere does not exist'):
        load_tool('class_stats').main([str(tmp_path), '--ann-dir', 'nowhere', '--suffix', '.png'])
