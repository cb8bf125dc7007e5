"""Datasets for ``python -m shvit train``: an ImageFolder reader (Pillow) and a built-in synthetic dataset.

Both return uint8 (3, S, S) images; the trainer normalises on the device. Every random choice of an
augmentation comes from a generator seeded by (seed, epoch, index), so a sample depends on nothing else:
the same under any number of loader workers, and a run resumed in the middle of an epoch sees exactly the
images it would have seen.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
EVAL_CROP_PCT = 0.875  # DeiT/LeViT evaluation: resize to size / 0.875, centre crop


class DatasetError(ValueError):
    """A dataset folder that cannot be used (missing, no classes, an empty class, classes that differ)."""


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 100_003 + epoch) << 32) + index & (2**63 - 1))


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("reading an image folder needs Pillow (pip install pillow); without it use the synthetic dataset") from None
    return Image


def _to_uint8_tensor(img) -> torch.Tensor:
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def random_resized_crop_box(w: int, h: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """Inception-style crop: area fraction in ``scale``, log-uniform aspect ratio; centre crop after 10 misses."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            return left, top, left + cw, top + ch
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (sub-folders of a class are searched too); classes sorted by name.

    ``train=True``: random resized crop + horizontal flip; ``False``: resize to size/0.875 and centre crop.
    An image that cannot be decoded is skipped with a warning: ``__getitem__`` returns None, which
    :func:`collate` drops and counts.
    """

    def __init__(self, root: str, img_size: int, train: bool, seed: int = 0, classes: Optional[Sequence[str]] = None, what: str = "--data-dir"):
        if not os.path.isdir(root):
            raise DatasetError(f"{what}: dataset folder not found: {root!r}")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not found:
            raise DatasetError(f"{what}: {root!r} has no class folders (expected {root}/<class>/<image>)")
        if classes is not None and list(classes) != found:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise DatasetError(f"{what}: the classes of {root!r} differ from the training set's (extra: {extra[:5]}, missing: {missing[:5]})")
        self.classes: List[str] = found
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(found):
            files = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
                dirnames.sort()
                files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
            if not files:
                raise DatasetError(
                    f"{what}: class folder {os.path.join(root, name)!r} has no images (extensions: {', '.join(IMG_EXTENSIONS)})"
                )
            self.samples += [(f, label) for f in files]
        self.img_size, self.train, self.seed, self.epoch = img_size, train, seed, 0
        self.image = _pil()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        Image, s = self.image, self.img_size
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping unreadable image {path!r}: {e}", stacklevel=2)
            return None
        w, h = img.size
        if self.train:
            g = sample_generator(self.seed, self.epoch, index)
            img = img.resize((s, s), Image.BICUBIC, box=random_resized_crop_box(w, h, g))
            if torch.rand(1, generator=g).item() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:  # the centre square that resizing to s / crop_pct and cropping s would keep
            half = min(w, h) * EVAL_CROP_PCT / 2
            img = img.resize((s, s), Image.BICUBIC, box=(w / 2 - half, h / 2 - half, w / 2 + half, h / 2 + half))
        return _to_uint8_tensor(img), label


class SyntheticDataset(Dataset):
    """Learnable random data: each class is a fixed smooth colour pattern, each sample that pattern plus noise."""

    def __init__(self, num_samples: int, num_classes: int, img_size: int, train: bool, seed: int = 0):
        if num_samples < 1 or num_classes < 1:
            raise DatasetError(f"synthetic dataset: needs at least one sample and one class, got {num_samples}, {num_classes}")
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(num_classes, 3, 4, 4, generator=g)
        self.templates = F.interpolate(templates, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.num_samples, self.num_classes, self.img_size = num_samples, num_classes, img_size
        self.seed, self.epoch, self.split = seed, 0, 0 if train else 1
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        label = index % self.num_classes
        # The noise depends on the sample only, so every epoch sees the same training set.
        g = sample_generator(self.seed + 1 + self.split, 0, index)
        noise = torch.randn(3, self.img_size, self.img_size, generator=g)
        img = (128 + 48 * (self.templates[label] + 0.8 * noise)).clamp_(0, 255).to(torch.uint8)
        return img, label


def collate(batch):
    """Stack the readable samples; returns (images, labels, number of skipped samples)."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    return torch.stack([b[0] for b in kept]), torch.tensor([b[1] for b in kept]), skipped


class EpochSampler(Sampler):
    """This process's share of an epoch: shuffled by (seed, epoch) when ``shuffle``, padded to a multiple of
    the world size (training) or not (evaluation: shards differ by at most one sample), from ``start`` on.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0, pad: bool = True):
        self.n, self.rank, self.world, self.shuffle, self.seed, self.pad = n, rank, world, shuffle, seed, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> List[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n % self.world:
            order += order[: self.world - self.n % self.world]
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self._indices()) - self.start

    def __iter__(self):
        return iter(self._indices()[self.start :])
