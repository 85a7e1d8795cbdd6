"""Checkpoint loading that keeps ``torch.load(weights_only=True)`` and explains failures.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7 calls ``torch.load``
without the argument, so its own checkpoints (which pickle a ``HistoryBuffer`` and numpy scalars in
``message_hub``) no longer load. The fix is to allow exactly the globals mmengine writes, never to
turn ``weights_only`` off: a checkpoint that carries any other global (e.g. a malicious
``os.system`` reduce) is still refused by torch's restricted unpickler.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    'CheckpointError',
    'allow_mmengine_checkpoints',
    'load_checkpoint_file',
    'url_cache_name',
    'describe_key_mismatch',
    'extract_state_dict',
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model."""


def _mmengine_safe_globals() -> list:
    """The classes and functions mmengine 0.10.7 pickles into a checkpoint (and nothing else)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    numpy_globals: list = [np.dtype, np.ndarray, np.core.multiarray._reconstruct]
    try:  # numpy >= 2 moved the multiarray module
        numpy_globals.append(np._core.multiarray._reconstruct)
        numpy_globals.append(np._core.multiarray.scalar)
    except AttributeError:
        pass
    numpy_globals.append(np.core.multiarray.scalar)
    # message_hub stores numpy scalars and arrays of these dtypes (losses, lr, data_time, ...)
    dtype_classes = [
        type(np.dtype(t))
        for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'int8', 'uint8', 'bool')
    ]
    # HistoryBuffer pickles its statistics methods as getattr(HistoryBuffer, 'mean') etc.;
    # builtins.getattr itself would let a crafted pickle walk to any object, so we allow a
    # stand-in that resolves exactly those attributes.
    return [
        HistoryBuffer,
        *numpy_globals,
        *dtype_classes,
        (_history_buffer_attr, 'builtins.getattr'),
    ]


_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')


def _history_buffer_attr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to HistoryBuffer's statistics methods (used while unpickling)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'Unsupported global: getattr({obj!r}, {name!r}) is outside the checkpoint allowlist'
    )


_ALLOWED = False


def allow_mmengine_checkpoints() -> None:
    """Allow exactly mmengine's checkpoint globals in ``torch.load(weights_only=True)``.

    Idempotent. Called by effvision's tools and ``register_all_modules`` so that
    ``runner.resume`` and ``load_checkpoint`` work on torch >= 2.6 without disabling the safe
    unpickler.
    """
    global _ALLOWED
    if _ALLOWED:
        return
    torch.serialization.add_safe_globals(_mmengine_safe_globals())
    _ALLOWED = True


def url_cache_name(url: str) -> str:
    """Cache file name of a downloaded checkpoint: the URL's last part plus a hash of the URL.

    torch.hub names cached files by the URL's last part alone, so two checkpoints behind URLs that
    end alike (OneDrive's ``.../root/content``) would share one file and the second would silently
    load the first one's weights.
    """
    base = os.path.basename(urllib.parse.urlparse(url).path) or 'checkpoint'
    return f'{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}'


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = 'cpu') -> Any:
    """Load a checkpoint with ``weights_only=True`` and turn every failure into a clear message.

    Args:
        path: Local file path or an ``http(s)://`` URL (downloaded through ``torch.hub``).
        map_location: Passed to ``torch.load``.

    Returns:
        Whatever the file holds (usually a dict with ``state_dict``/``model``/``meta`` keys, or a
        bare state dict).

    Raises:
        CheckpointError: The file is missing, is not a checkpoint, is truncated or corrupt, or
            carries pickled objects outside the allowlist.
    """
    allow_mmengine_checkpoints()
    path_str = os.fspath(path)
    if path_str.startswith(('http://', 'https://')):
        try:
            return torch.hub.load_state_dict_from_url(
                path_str,
                map_location=map_location,
                weights_only=True,
                file_name=url_cache_name(path_str),
            )
        except Exception as err:  # network and format errors alike
            raise CheckpointError(
                f'could not download checkpoint {path_str}: {err}. Download it by hand and pass '
                'the local path.'
            ) from err
    file = Path(path_str).expanduser()
    if not file.exists():
        raise CheckpointError(
            f'checkpoint not found: {file}. Check the path (relative paths are resolved from '
            f'{Path.cwd()}), or pass the file downloaded from the model zoo.'
        )
    if file.is_dir():
        raise CheckpointError(f'checkpoint path is a directory, not a file: {file}')
    if file.stat().st_size == 0:
        raise CheckpointError(f'checkpoint file is empty (0 bytes): {file}. Download it again.')
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        if 'unsupported global' in msg.lower():
            raise CheckpointError(
                f'refused to load {file}: it contains pickled Python objects outside the '
                'allowlist of weights_only loading, which could run arbitrary code. If you trust '
                'the file, re-save its tensors only: torch.save(state_dict, new_path). '
                f'(torch said: {_unsupported_global_line(msg)})'
            ) from err
        raise CheckpointError(
            f'checkpoint {file} is corrupt or not a PyTorch checkpoint ({msg}). Download it again.'
        ) from err
    except Exception as err:  # torch raises many types for damaged files (IndexError, ...)
        raise CheckpointError(
            f'checkpoint {file} is truncated or corrupt ({type(err).__name__}: '
            f'{str(err).splitlines()[0] if str(err) else "no detail"}). It is '
            f'{file.stat().st_size} bytes; download or copy it again.'
        ) from err


def _unsupported_global_line(message: str) -> str:
    for line in message.splitlines():
        if 'unsupported global' in line.lower():
            return line.strip()
    return message.splitlines()[0]


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Return the state dict inside a checkpoint of any of the usual layouts.

    Accepts mmengine checkpoints (``state_dict``), official timm/Swin/DeiT checkpoints (``model``),
    ``state_dict_ema``-style wrappers, and bare state dicts. Strips a leading ``module.``
    (DataParallel) from every key.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f'expected a checkpoint dict, got {type(checkpoint).__name__}: the file does not hold '
            'model weights.'
        )
    for key in ('state_dict', 'model', 'model_state', 'state_dict_ema'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(
            f'no tensors found in the checkpoint (top-level keys: {list(checkpoint)[:8]}).'
        )
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.') :]: v for k, v in state.items()}
    return state


def describe_key_mismatch(
    missing: Iterable[str],
    unexpected: Iterable[str],
    shape_mismatch: Iterable[str] = (),
    n: int = 5,
) -> str:
    """Summarise a key mismatch with counts and a few examples of each kind."""
    parts = []
    for label, keys in (
        ('missing', list(missing)),
        ('unexpected', list(unexpected)),
        ('shape mismatch', list(shape_mismatch)),
    ):
        if keys:
            more = f', ... (+{len(keys) - n})' if len(keys) > n else ''
            parts.append(f'{len(keys)} {label}: {", ".join(keys[:n])}{more}')
    return '; '.join(parts) if parts else 'all keys match'
