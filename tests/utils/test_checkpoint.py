"""Checkpoint loading: safe unpickling and actionable errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

from effvision.utils import (
    CheckpointError,
    allow_mmengine_checkpoints,
    describe_key_mismatch,
    extract_state_dict,
    load_checkpoint_file,
)
from effvision.utils.checkpoint import (
    url_cache_name,
)


class _Exploit:
    """Pickles to a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match='checkpoint not found: .*nope.pth'):
        load_checkpoint_file(tmp_path / 'nope.pth')


def test_empty_file(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        load_checkpoint_file(tmp_path / 'empty.pth')


@pytest.mark.parametrize('seed', range(5))
def test_corrupt_file(tmp_path, seed):
    junk = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / 'junk.pth').write_bytes(junk)
    with pytest.raises(CheckpointError, match='corrupt'):
        load_checkpoint_file(tmp_path / 'junk.pth')


def test_text_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / 'config.pth').write_text("model = dict(type='EncoderDecoder')\n")
    with pytest.raises(CheckpointError, match='corrupt'):
        load_checkpoint_file(tmp_path / 'config.pth')


def test_truncated_file(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'w': torch.randn(256, 256)}}, good)
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint_file(cut)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / 'pwned'
    file = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': _Exploit(marker)}, file)
    with pytest.raises(CheckpointError, match='refused to load'):
        load_checkpoint_file(file)
    assert not marker.exists()
    # also through a bare torch.load after our allowlist is installed: still refused
    allow_mmengine_checkpoints()
    with pytest.raises(Exception, match='(?i)unsupported global'):
        torch.load(file, weights_only=True)
    assert not marker.exists()


def test_mmengine_objects_are_allowed(tmp_path):
    buffer = HistoryBuffer()
    buffer.update(np.float64(0.5))
    file = tmp_path / 'runner.pth'
    torch.save({'message_hub': {'log_scalars': {'loss': buffer}}, 'meta': {'np': np.int64(3)},
                'state_dict': {'w': torch.ones(2)}}, file)  # fmt: skip
    ckpt = load_checkpoint_file(file)
    assert ckpt['message_hub']['log_scalars']['loss'].current() == 0.5


def test_extract_state_dict_layouts():
    w = torch.ones(1)
    assert extract_state_dict({'state_dict': {'a': w}}) == {'a': w}
    assert extract_state_dict({'model': {'a': w}}) == {'a': w}
    assert extract_state_dict({'module.a': w, 'module.b': w}) == {'a': w, 'b': w}
    with pytest.raises(CheckpointError, match='no tensors'):
        extract_state_dict({'meta': {}})


def test_describe_key_mismatch_counts_and_examples():
    text = describe_key_mismatch([f'm{i}' for i in range(7)], ['u0'])
    assert text.startswith('7 missing: m0, m1, m2, m3, m4, ... (+2)')
    assert '1 unexpected: u0' in text


class _GetattrExploit:
    """Reaches os.system through getattr chains: must be refused even though HistoryBuffer's
    own getattr(HistoryBuffer, 'mean') is allowed."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


def test_getattr_is_only_allowed_for_history_buffer_methods(tmp_path):
    file = tmp_path / 'getattr.pth'
    torch.save({'meta': _GetattrExploit()}, file)
    with pytest.raises(CheckpointError, match='refused to load'):
        load_checkpoint_file(file)


def test_urls_ending_alike_get_distinct_cache_files():
    """OneDrive links all end in /root/content: the cache name must tell them apart."""
    a = url_cache_name('https://api.onedrive.com/v1.0/shares/u!AAA/root/content')
    b = url_cache_name('https://api.onedrive.com/v1.0/shares/u!BBB/root/content')
    assert a != b and a.endswith('-content') and b.endswith('-content')
    same = 'https://x.org/swin_tiny_patch4_window7_224.pth'
    assert url_cache_name(same) == url_cache_name(same)
    assert url_cache_name(same).endswith('-swin_tiny_patch4_window7_224.pth')
