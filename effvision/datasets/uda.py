"""Pairs of labelled source and unlabelled target samples for domain adaptation, with rare class
sampling (RCS).

Reference: Hoyer et al., "DAFormer", CVPR 2022; official code lhoyer/DAFormer
(``mmseg/datasets/uda_dataset.py``, mmseg 0.16). The pairing, the RCS probabilities, the order of
the random draws and the re-crop loop follow it; what differs: samples are mmseg 1.x packed
dicts, the statistics may live outside the source's data root (``stats_dir``), and bad
statistics or configs stop with a message instead of an assertion or a ``KeyError``.
"""

from __future__ import annotations

import copy
import json
import os.path as osp
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from mmengine.logging import print_log

from effvision.registry import DATASETS

from .class_stats import SAMPLE_CLASS_STATS, SAMPLES_WITH_CLASS

RCS_DEFAULTS = dict(class_temp=0.01, min_pixels=3000, min_crop_ratio=0.5)
# Further pipeline runs (fresh random crops) RCS allows for the chosen class to appear.
RCS_MAX_RECROPS = 10


def rcs_class_probabilities(
    sample_class_stats: Sequence[Mapping], class_temp: float
) -> tuple[list[int], np.ndarray]:
    """DAFormer's rare class sampling distribution, ``P(c) = softmax((1 - f_c) / T)``.

    ``f_c`` is class c's share of all labelled source pixels. The classes are those present in
    the statistics, ordered by ascending pixel count (ties keep the order of first appearance),
    as the official code orders them; the order matters for reproducing its draws.

    Args:
        sample_class_stats: The content of ``sample_class_stats.json``.
        class_temp: Temperature ``T``; smaller favours rare classes more.

    Returns:
        The class ids and their probabilities (float64, summing to one).
    """
    totals: dict[int, int] = {}
    for entry in sample_class_stats:
        for key, pixels in entry.items():
            if key != 'file':
                totals[int(key)] = totals.get(int(key), 0) + int(pixels)
    classes = sorted(totals, key=totals.__getitem__)
    counts = np.array([totals[c] for c in classes], dtype=np.float64)
    if not classes or counts.sum() == 0:
        return [], np.zeros(0)
    logits = (1.0 - counts / counts.sum()) / class_temp
    probs = np.exp(logits - logits.max())
    return classes, probs / probs.sum()


def _is_uda(dataset) -> bool:
    if isinstance(dataset, Mapping):
        kind = dataset.get('type')
        return kind is UDADataset or (isinstance(kind, str) and kind.split('.')[-1] == 'UDADataset')
    return isinstance(dataset, UDADataset)


def _class_names(dataset) -> tuple:
    return tuple(dataset.metainfo.get('classes') or ())


@DATASETS.register_module()
class UDADataset:
    """Labelled source samples paired with unlabelled target samples.

    An item is a dict of four keys: ``inputs`` and ``data_samples``, the source sample as its
    pipeline packs it (``PackSegInputs``: an image tensor and a ``SegDataSample`` with
    ``gt_sem_seg``), and ``target_inputs`` and ``target_data_samples``, the target sample.
    ``mmengine.dataset.pseudo_collate`` turns a batch of them into a dict of four lists; the
    model's data preprocessor normalises both domains. :attr:`metainfo` is the target's, which
    is what a model trained on this dataset is evaluated on.

    Without rare class sampling an index enumerates every (source, target) pair:
    ``idx -> (source[idx // len(target)], target[idx % len(target)])``, so the sampler's
    shuffling decides the pairs. With it the index is ignored and each item is drawn: a class
    ``c`` with probability :func:`rcs_class_probabilities`, a source image uniformly among those
    with more than ``min_pixels`` pixels of ``c``, re-running the source pipeline (a fresh random
    crop) up to ``RCS_MAX_RECROPS`` times until the crop holds more than
    ``min_pixels * min_crop_ratio`` pixels of ``c`` (no re-crop when ``min_crop_ratio`` is 0),
    and a target image uniformly. The length is ``len(source) * len(target)`` without RCS and
    ``len(source)`` with it: the official code keeps the product there too, but with the index
    unused it only costs the sampler a list of that many indices (GTA5 x Cityscapes: 74 million,
    several GiB as the Python list mmengine's samplers build).

    Randomness: the draws use NumPy's global generator (``np.random``), as the pipeline
    transforms do. mmengine seeds it in every dataloader worker from the run's seed
    (``randomness=dict(seed=...)``) and, when a run resumes, advances the dataloader through
    the batches already trained on, replaying the same draws; so with the seed fixed in the
    config, a resumed run sees the same samples as an uninterrupted one.

    RCS reads ``sample_class_stats.json`` and ``samples_with_class.json`` (the official
    converters' layout; see :mod:`effvision.datasets.class_stats`) from ``stats_dir``, matching
    their file names to the source's label maps by base name.

    Args:
        source: The labelled dataset, or its config (built with effvision's ``DATASETS``).
        target: The unlabelled dataset, or its config; same classes as ``source``.
        rare_class_sampling: ``None`` (off) or a dict with any of ``class_temp`` (0.01),
            ``min_pixels`` (3000) and ``min_crop_ratio`` (0.5); the defaults are DAFormer's.
            ``min_pixels`` counts pixels of the label maps the statistics were computed on, at
            their full resolution.
        stats_dir: Folder of the statistics; defaults to the source's ``data_root``.
        lazy_init: Defer reading the statistics and building the RCS tables to the first item
            or :meth:`full_init` (which also completes lazily initialised datasets).
    """

    def __init__(
        self,
        source: Mapping | object,
        target: Mapping | object,
        rare_class_sampling: Mapping | None = None,
        stats_dir: str | Path | None = None,
        lazy_init: bool = False,
    ) -> None:
        for role, dataset in (('source', source), ('target', target)):
            if _is_uda(dataset):
                raise TypeError(
                    f'the {role} of a UDADataset is itself a UDADataset; give the source and '
                    f'target datasets (e.g. GTA5Dataset and CityscapesDataset) directly'
                )
        self.source = DATASETS.build(source) if isinstance(source, Mapping) else source
        self.target = DATASETS.build(target) if isinstance(target, Mapping) else target
        for role, dataset in (('source', self.source), ('target', self.target)):
            if isinstance(dataset, UDADataset):
                raise TypeError(f'the {role} of a UDADataset cannot be a UDADataset')

        source_classes, target_classes = _class_names(self.source), _class_names(self.target)
        if source_classes != target_classes:
            raise ValueError(
                'source and target datasets have different classes, so one of them is the '
                'wrong domain or the wrong config: source '
                f'{type(self.source).__name__} {list(source_classes)} vs target '
                f'{type(self.target).__name__} {list(target_classes)}; give both the same '
                'classes (e.g. metainfo=dict(classes=...) on each)'
            )

        self.rcs_cfg = self._check_rcs_cfg(rare_class_sampling)
        self.stats_dir = stats_dir
        self.rcs_classes: list[int] = []
        self.rcs_class_probs = np.zeros(0)
        self._rcs_indices: dict[int, np.ndarray] = {}
        self._fully_initialized = False
        if not lazy_init:
            self.full_init()

    @staticmethod
    def _check_rcs_cfg(cfg: Mapping | None) -> dict | None:
        if cfg is None:
            return None
        unknown = sorted(set(cfg) - set(RCS_DEFAULTS))
        if unknown:
            raise ValueError(
                f'rare_class_sampling has unknown keys {unknown}; the keys are '
                f'{sorted(RCS_DEFAULTS)} (DAFormer: {RCS_DEFAULTS})'
            )
        cfg = {**RCS_DEFAULTS, **cfg}
        if not cfg['class_temp'] > 0:
            raise ValueError(f'rare_class_sampling.class_temp must be > 0, got {cfg["class_temp"]}')
        for key in ('min_pixels', 'min_crop_ratio'):
            if not cfg[key] >= 0:
                raise ValueError(f'rare_class_sampling.{key} must be >= 0, got {cfg[key]}')
        return cfg

    @property
    def metainfo(self) -> dict:
        """The target dataset's meta information (classes, palette, ...)."""
        return copy.deepcopy(self.target.metainfo)

    @property
    def rcs_enabled(self) -> bool:
        return self.rcs_cfg is not None

    def full_init(self) -> None:
        """Fully initialise both datasets and build the rare class sampling tables."""
        if self._fully_initialized:
            return
        for dataset in (self.source, self.target):
            if hasattr(dataset, 'full_init'):
                dataset.full_init()
        if self.rcs_enabled:
            self._init_rcs()
        self._fully_initialized = True

    def __len__(self) -> int:
        if self.rcs_enabled:
            return len(self.source)
        return len(self.source) * len(self.target)

    def __getitem__(self, idx: int) -> dict:
        if not self._fully_initialized:
            self.full_init()
        if self.rcs_enabled:
            source, target = self._rare_class_pair()
        else:
            if not 0 <= idx < len(self):
                raise IndexError(f'index {idx} out of range for a UDADataset of {len(self)}')
            source = self.source[idx // len(self.target)]
            target = self.target[idx % len(self.target)]
        return dict(
            inputs=source['inputs'],
            data_samples=source['data_samples'],
            target_inputs=target['inputs'],
            target_data_samples=target['data_samples'],
        )

    # Rare class sampling ---------------------------------------------------------------------

    def _stats_command(self) -> str:
        """The command that writes the statistics for this source, for messages."""
        kind = type(self.source).__name__
        root = getattr(self.source, 'data_root', None) or 'DATA_ROOT'
        if kind == 'GTA5Dataset':
            return f'python tools/dataset_converters/gta.py {root}'
        if kind == 'SynthiaDataset':
            return f'python tools/dataset_converters/synthia.py {root}'
        prefix = getattr(self.source, 'data_prefix', {}).get('seg_map_path') or 'LABEL_DIR'
        if root != 'DATA_ROOT' and prefix != 'LABEL_DIR':
            prefix = osp.relpath(prefix, root)
        suffix = getattr(self.source, 'seg_map_suffix', '.png')
        return (
            f'python tools/dataset_converters/class_stats.py {root} --ann-dir {prefix} '
            f'--suffix {suffix}'
        )

    def _read_stats(self) -> tuple[Path, list, dict]:
        stats_dir = self.stats_dir or getattr(self.source, 'data_root', None)
        if not stats_dir:
            raise ValueError(
                f'rare class sampling needs class statistics, and the source '
                f'{type(self.source).__name__} has no data_root to find them in; pass '
                f'stats_dir=<folder of {SAMPLE_CLASS_STATS} and {SAMPLES_WITH_CLASS}>'
            )
        stats_dir = Path(stats_dir)
        paths = [stats_dir / SAMPLE_CLASS_STATS, stats_dir / SAMPLES_WITH_CLASS]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f'rare class sampling needs {" and ".join(missing)} in {stats_dir}; write the '
                f'statistics of the source labels with `{self._stats_command()}` (or point '
                'stats_dir at them, or set rare_class_sampling=None)'
            )
        contents = []
        for path in paths:
            try:
                with open(path) as f:
                    contents.append(json.load(f))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f'{path} is not valid JSON ({err}); rewrite it with `{self._stats_command()}`'
                ) from None
        return stats_dir, contents[0], contents[1]

    def _init_rcs(self) -> None:
        cfg = self.rcs_cfg
        stats_dir, sample_class_stats, samples_with_class = self._read_stats()
        rewrite = f'rewrite them with `{self._stats_command()}`'
        classes, probs = rcs_class_probabilities(sample_class_stats, cfg['class_temp'])
        if not classes:
            raise ValueError(
                f'{stats_dir / SAMPLE_CLASS_STATS} counts no labelled pixel; {rewrite}'
            )
        names = _class_names(self.source)
        if max(classes) >= len(names):
            raise ValueError(
                f'the statistics in {stats_dir} hold class id {max(classes)}, but the source has '
                f'{len(names)} classes: they are not train ids of this dataset; {rewrite}'
            )
        samples_with_class = {int(c): files for c, files in samples_with_class.items()}

        by_name: dict[str, int] = {}
        for i in range(len(self.source)):
            seg_map = self.source.get_data_info(i).get('seg_map_path')
            if seg_map is not None:
                by_name.setdefault(osp.basename(seg_map), i)

        indices: dict[int, np.ndarray] = {}
        for c in classes:
            if c not in samples_with_class:
                raise ValueError(
                    f'class {c} is in {SAMPLE_CLASS_STATS} but not in {SAMPLES_WITH_CLASS} '
                    f'({stats_dir}): the two files do not belong together; {rewrite}'
                )
            entries = samples_with_class[c]
            files = [file for file, pixels in entries if pixels > cfg['min_pixels']]
            if not files:
                most = max((pixels for _, pixels in entries), default=0)
                raise ValueError(
                    f'rare class sampling: no source image has more than min_pixels='
                    f'{cfg["min_pixels"]} pixels of class {c} ({names[c]}); the most in one '
                    f'image is {most}. Lower rare_class_sampling.min_pixels: the published '
                    f"3000 suits GTA5-sized label maps (1914x1052), and DAFormer's author "
                    f'advises lowering it for small images'
                )
            unknown = [f for f in files if osp.basename(f) not in by_name]
            if unknown:
                raise ValueError(
                    f'{len(unknown)} label maps named in {stats_dir / SAMPLES_WITH_CLASS} are '
                    f'not in the source dataset {type(self.source).__name__} (e.g. '
                    f'{unknown[0]}): the statistics belong to another dataset or label suffix; '
                    f'{rewrite}, or set stats_dir to those of this source'
                )
            indices[c] = np.array([by_name[osp.basename(f)] for f in files], dtype=np.int64)

        self.rcs_classes, self.rcs_class_probs, self._rcs_indices = classes, probs, indices
        summary = ', '.join(f'{c}: {p:.4f}' for c, p in zip(classes, probs))
        print_log(f'RCS class probabilities ({stats_dir}): {summary}', logger='current')

    def _class_pixels(self, sample: dict, class_id: int) -> int:
        gt = getattr(sample.get('data_samples'), 'gt_sem_seg', None)
        if gt is None:
            raise ValueError(
                'rare class sampling counts class pixels in the packed source sample, which has '
                'no gt_sem_seg: the source pipeline must LoadAnnotations and end with '
                'PackSegInputs'
            )
        return int((gt.data == class_id).sum())

    def _rare_class_pair(self) -> tuple[dict, dict]:
        cfg = self.rcs_cfg
        class_id = self.rcs_classes[np.random.choice(len(self.rcs_classes), p=self.rcs_class_probs)]
        index = int(np.random.choice(self._rcs_indices[class_id]))
        source = self.source[index]
        if cfg['min_crop_ratio'] > 0:
            wanted = cfg['min_pixels'] * cfg['min_crop_ratio']
            for _ in range(RCS_MAX_RECROPS):
                if self._class_pixels(source, class_id) > wanted:
                    break
                source = self.source[index]
        target = self.target[np.random.randint(len(self.target))]
        return source, target
