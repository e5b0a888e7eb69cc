"""Training data sources and the resumable order in which samples are visited."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import CocoDetectionDataset, DatasetError, GroundingDataset, GroundingSample, ShapesWorldDataset

# The shapes world has a sample for every integer; this bounds the index space only.
SHAPES_LENGTH = 1 << 40


class ConcatSamples:
    """Several datasets as one, visited epoch by epoch in a seeded permutation.

    index(k, seed) maps the k-th sample drawn in training to a dataset index, so the
    position to resume from is the number of samples drawn so far.
    """

    def __init__(self, datasets: list, shuffle: bool) -> None:
        if not datasets:
            raise DatasetError("no training data given")
        self.datasets = datasets
        self.sizes = [len(d) for d in datasets]
        self.offsets = np.cumsum([0, *self.sizes])
        self.shuffle = shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def index(self, k: int, seed: int) -> int:
        if not self.shuffle:
            return k % len(self)
        epoch, pos = divmod(k, len(self))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([seed, epoch]).permutation(len(self)))
        return int(self._perm[1][pos])

    def __getitem__(self, i: int) -> GroundingSample:
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.datasets[d][i - int(self.offsets[d])]


def build_datasets(spec: str, seed: int, grounding_fraction: float, understanding: bool = False,
                   plurals: float = 0.0, relations: float = 0.0) -> ConcatSamples:
    """"shapes", or comma-separated KIND:ANNOTATIONS:IMAGES with KIND in {coco, grounding}.

    understanding: shapes samples also carry a question and captions of their image;
    plurals / relations: the shares of shapes grounding samples that also name shapes in the
    plural / get more relation phrases (ShapesWorldDataset)."""
    if spec == "shapes":
        return ConcatSamples([ShapesWorldDataset(seed, SHAPES_LENGTH, grounding_fraction, understanding=understanding,
                                                 plurals=plurals, relations=relations)], shuffle=False)
    datasets = []
    for part in spec.split(","):
        kind, _, rest = part.partition(":")
        ann, _, images = rest.partition(":")
        if kind not in ("coco", "grounding") or not ann or not images:
            raise DatasetError(f"training data {part!r}: expected coco:ANNOTATIONS:IMAGES or grounding:ANNOTATIONS:IMAGES")
        cls = CocoDetectionDataset if kind == "coco" else GroundingDataset
        datasets.append(cls(Path(ann), Path(images)))
    return ConcatSamples(datasets, shuffle=True)
