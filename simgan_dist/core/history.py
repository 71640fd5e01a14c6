"""The history of refined images (paper §2.3): D's fake half-batch is half current, half past.

Pure tensors, no Ray: the distributed buffer actors wrap exactly this class. Training stores
integer codes (`CodedHistory`: uint8 for 8-bit images, the data's own precision; int16 for depth).

Semantics:
- fill phase: while fewer than `capacity` images are stored, pushes append;
- sampling: `sample(k)` draws k stored images uniformly without replacement;
- replacement: once full, a push of b/2 images overwrites b/2 distinct random slots.
"""

from __future__ import annotations

import torch

from simgan_dist.core.imaging import from_history_codes, history_codes


class HistoryBuffer:
    def __init__(self, capacity: int, image_shape: tuple[int, ...], seed: int = 0,
                 dtype: torch.dtype = torch.float16):
        if capacity < 1:
            raise ValueError(f"history buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.image_shape = tuple(image_shape)
        self.images = torch.empty((capacity, *self.image_shape), dtype=dtype)
        self.size = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def push(self, images: torch.Tensor) -> torch.Tensor:
        """Store images; returns the slot index each one went to."""
        images = images.detach().to("cpu", self.images.dtype)
        if images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"history buffer holds {self.image_shape} images, got {tuple(images.shape[1:])}")
        n = min(len(images), self.capacity)
        images = images[:n]
        free = self.capacity - self.size
        appended = torch.arange(self.size, self.size + min(n, free))
        # Slots to overwrite are distinct, and never ones filled by this same push.
        overwrite = n - len(appended)
        replaced = torch.randperm(self.size, generator=self.generator)[:overwrite]
        slots = torch.cat([appended, replaced])
        self.images[slots] = images
        self.size += len(appended)
        return slots

    def sample(self, k: int) -> torch.Tensor:
        if self.size == 0:
            raise ValueError("history buffer is empty: push refined images before sampling")
        k = min(k, self.size)
        idx = torch.randperm(self.size, generator=self.generator)[:k]
        return self.images[idx].clone()

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "image_shape": self.image_shape,
            "images": self.images[: self.size].clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity or tuple(state["image_shape"]) != self.image_shape:
            raise ValueError(
                f"history buffer state is for capacity {state['capacity']} of {tuple(state['image_shape'])}, "
                f"this buffer is {self.capacity} of {self.image_shape}"
            )
        stored = state["images"]
        self.size = len(stored)
        self.images[: self.size] = stored
        self.generator.set_state(state["generator"])


class CodedHistory:
    """A `HistoryBuffer` of integer codes (`imaging.history_codes`): uint8 for 8-bit images, int16 for depth.

    The `History` interface for one process, with exactly the shared buffer's storage
    (distributed_history), so local and distributed runs see the same past images.
    """

    def __init__(self, capacity: int, image_shape: tuple[int, ...], seed: int = 0, wide: bool = False,
                 device: torch.device | str = "cpu"):
        self.buffer = HistoryBuffer(capacity, image_shape, seed, dtype=torch.int16 if wide else torch.uint8)
        self.wide = wide
        self.device = torch.device(device)
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.buffer)

    def push(self, images: torch.Tensor) -> torch.Tensor:
        return self.buffer.push(history_codes(images, self.wide))

    def sample(self, k: int) -> torch.Tensor:
        return from_history_codes(self.buffer.sample(k), self.device, torch.float32)

    def state_dict(self) -> dict:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state)
