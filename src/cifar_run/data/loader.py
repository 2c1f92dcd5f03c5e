"""Batches gathered by index from uint8 tensors that live on the training device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cifar_run.data.augment import Augment
from cifar_run.data.mix import Mix, epoch_rng
from cifar_run.data.sources import ArraySplit


class DeviceLoader:
    """Iterate (normalized float images, labels) batches without DataLoader workers.

    The images are copied to `device` once as uint8 (CIFAR-10 train is 150 MB), and each
    batch is indexed, augmented and normalized there. The order is `torch.randperm` from a
    CPU generator, the same permutation `RandomSampler(generator=...)` draws.
    `memory_format=torch.channels_last` hands out NHWC batches (for conv nets). With `mix`,
    batches are mixed after normalization and the labels are (B, classes) probabilities.
    """

    def __init__(
        self,
        split: ArraySplit,
        batch_size: int,
        *,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        mix: Mix | None = None,
    ) -> None:
        self.images = split.images.to(device)
        # On the CPU, channels_last batches without augmentation are gathered straight from
        # NHWC rows (the images keep their NCHW shape with channels_last strides): turning a
        # 3-channel uint8 batch into NHWC costs more than everything else a batch needs
        # (docs/speed.md). Augmentations take NCHW batches.
        self._gather_nhwc = (
            device.type == "cpu"
            and memory_format == torch.channels_last
            and augment is None
            and self.images.dim() == 4
        )
        if self._gather_nhwc:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.augment = augment
        self.memory_format = memory_format
        self.order_generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.mix = mix
        self.mix_generator = torch.Generator().manual_seed(seed + 2)
        # Folding 1/255 into the normalization saves a pass over every batch.
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(
            1, -1, 1, 1
        )
        # The same per value of one image, in NCHW and in NHWC order, for the CPU's
        # normalization (`_normalized`).
        self._per_value: dict[torch.memory_format, tuple[torch.Tensor, torch.Tensor]] = {}
        if device.type == "cpu" and self.images.dim() == 4:
            image = self.images.shape[1:]
            self._per_value = {
                layout: (
                    _per_value(self.scale, image, layout),
                    _per_value(self.shift, image, layout),
                )
                for layout in (torch.contiguous_format, torch.channels_last)
            }

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The batch's uint8 images. index_select copies whole rows, several times faster on
        the CPU than `images[idx]` (advanced indexing), the more so the larger the batch."""
        if self._gather_nhwc:
            return self.images.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
        return self.images.index_select(0, idx)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float, normalized, in the batches' memory format. Equal to
        `x.float() * scale + shift` up to the last bit (a fused multiply-add rounds once).

        On CUDA one pass: addcmul reads the uint8 values and writes the float layout asked
        for, where reordering, converting, scaling and shifting would take four. On the CPU
        that pass is slow (mixed dtypes, a 3-long innermost loop for the per-channel
        factors); there the batch is converted to float as it lies in memory and scaled in
        place by factors per value of an image, one vectorised pass each, and then put in
        the memory format if it is not already (docs/speed.md)."""
        layout = _layout(x)
        if layout not in self._per_value or x.shape[1:] != self.images.shape[1:]:
            out = torch.empty(
                x.shape, dtype=torch.float32, device=x.device, memory_format=self.memory_format
            )
            return torch.addcmul(self.shift, x, self.scale, out=out)
        scale, shift = self._per_value[layout]
        nhwc = layout == torch.channels_last
        rows = (x.permute(0, 2, 3, 1) if nhwc else x).reshape(len(x), -1).float()
        torch.addcmul(shift, rows, scale, out=rows)
        n, c, h, w = x.shape
        out = rows.view(n, h, w, c).permute(0, 3, 1, 2) if nhwc else rows.view(n, c, h, w)
        return out.contiguous(memory_format=self.memory_format)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def indices(self) -> torch.Tensor:
        """This epoch's order; advances the order generator when shuffling."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        order = torch.randperm(n, generator=self.order_generator)
        # RandomSampler draws a second, empty-sliced permutation every epoch
        # (`randperm(n)[: num_samples % n]`); drawing it too keeps the two streams in step,
        # so a seed gives the same order as DataLoader(shuffle=True, generator=...).
        torch.randperm(n, generator=self.order_generator)
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices().to(self.device)
        rng = epoch_rng(self.mix_generator) if self.mix is not None else None
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self._gather(idx)
            if self.augment is not None:
                x = self.augment(x, self.augment_generator)
            x, y = self._normalized(x), self.labels.index_select(0, idx)
            if rng is not None:
                x, y = self.mix(x, y, rng)
            yield x, y


def _per_value(
    factor: torch.Tensor, image: torch.Size, layout: torch.memory_format
) -> torch.Tensor:
    """A per-channel factor (1, C, 1, 1) repeated for every value of one image of shape
    `image` (C, H, W), flattened in the memory order of `layout`."""
    one = factor.expand(1, *image).contiguous(memory_format=layout)
    return (one.permute(0, 2, 3, 1) if layout == torch.channels_last else one).flatten()


def _layout(x: torch.Tensor) -> torch.memory_format | None:
    """The memory order of a 4-d batch: NCHW, NHWC (channels_last), or None for neither."""
    if x.dim() != 4:
        return None
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None
