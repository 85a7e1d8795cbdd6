"""Data preprocessors that mmseg lacks."""

from __future__ import annotations

from typing import Any

from mmseg.models.data_preprocessor import SegDataPreProcessor

from effvision.registry import MODELS


@MODELS.register_module()
class UDADataPreProcessor(SegDataPreProcessor):
    """mmseg's preprocessing, applied to the source and to the target half of a UDA batch.

    A training batch from :class:`effvision.datasets.UDADataset` holds ``inputs`` and
    ``data_samples`` (labelled source) and ``target_inputs`` and ``target_data_samples``
    (target); both halves are converted, normalised and padded the same way and come back under
    the same keys. A batch without the target keys (validation, testing, inference) is processed
    exactly as :class:`mmseg.models.SegDataPreProcessor` does.
    """

    def forward(self, data: dict, training: bool = False) -> dict[str, Any]:
        if 'target_inputs' not in data:
            return super().forward(data, training)
        missing = {'inputs', 'data_samples', 'target_data_samples'} - set(data)
        if missing:
            raise KeyError(f'a UDA batch needs {sorted(missing)} as well (see UDADataset)')
        source = super().forward(
            dict(inputs=data['inputs'], data_samples=data['data_samples']), training
        )
        target = super().forward(
            dict(inputs=data['target_inputs'], data_samples=data['target_data_samples']), training
        )
        return dict(
            inputs=source['inputs'],
            data_samples=source['data_samples'],
            target_inputs=target['inputs'],
            target_data_samples=target['data_samples'],
        )
