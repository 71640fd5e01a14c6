"""DeepSpeed behind a small interface: R's and D's engines, their updater and their checkpoint files.

Nothing else in the project imports DeepSpeed. Where this module goes past DeepSpeed's public API,
it does so in one named function each, with the version it was checked on (deepspeed==0.19.8).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from simgan_dist.config import Config
from simgan_dist.train.recipe import build_networks

DS_TAG = "engine"  # DeepSpeed writes a file named "latest" beside the tag folder


def deepspeed_config(cfg: Config, bf16: bool) -> dict[str, Any]:
    """The engines' config: fp32 master weights, bf16 compute through torch autocast, no wrapper optimizer.

    With `"bf16": {"enabled": true}` DeepSpeed would hold bf16 weights and wrap the client
    optimizer in an fp32-master wrapper whose overflow check calls `.item()` parameter by
    parameter: dozens of host syncs per step. Its `torch_autocast` section instead keeps
    the weights fp32, runs convolutions in bf16 and hands our (fused, on CUDA) optimizer
    to the engine unwrapped under ZeRO-0, so a step never waits on the host.

    ZeRO stages: R and D hold ~0.3M parameters (Adam state ~4 MB), so partitioning optimizer
    states (ZeRO-1) or gradients too (ZeRO-2) saves nothing that matters and adds a
    gradient-norm/overflow `.item()` per step plus a partitioned all-gather. They pay off when
    parameters + Adam state (16 bytes per parameter) are a real share of GPU memory: from
    hundreds of millions of parameters (stage 1), with large gradient buffers too (stage 2).
    Stage 0 is the default; 1 and 2 stay selectable and tested.

    Timers (deepspeed==0.19.8 keys `timers.throughput` and `wall_clock_breakdown`) are off: both
    synchronize the device around every step.
    """
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 defaults to 1.0; the paper does not clip
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 1 << 30,
        # DeepSpeed's throughput timer is on by default and synchronizes the device at the start and
        # end of every engine step (two host waits a step on a GPU); its wall-clock breakdown times
        # forward/backward/step with synchronized timers too. We report our own timings.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "wall_clock_breakdown": False,
    }


def build_engines(cfg: Config, device: torch.device, bf16: bool,
                  memory_format: torch.memory_format = torch.contiguous_format) -> tuple[Any, Any]:
    """R's and D's DeepSpeed engines, with identical initial weights on every rank.

    The optimizers come from `algorithm.make_optimizer` (train.optimizer/betas/lr/lr_disc), fused
    on every device: one kernel, and the step counter stays a device tensor (no .item() per step).
    """
    import deepspeed

    engines = []
    for module, optimizer in build_networks(cfg, device, memory_format):
        engine, *_ = deepspeed.initialize(model=module, config=deepspeed_config(cfg, bf16), optimizer=optimizer)
        load_as_data(engine)
        if engine.dp_world_size == 1 and not cfg.train.zero_stage:
            # One rank has nothing to average: DeepSpeed would still copy every gradient into a
            # flat buffer, all-reduce it and copy it back, ~3% of a tiny-preset step on CPU.
            _skip_gradient_allreduce(engine)
        if cfg.train.compile:
            engine.compile()  # compiles engine.module in place: the bare-module calls use it too
        engines.append(engine)
    return engines[0], engines[1]


class DeepSpeedUpdater:
    """The `Updater` interface of algorithm.py over a DeepSpeed engine."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # also zeroes the gradients


def save_engines(folder: str, refiner_engine, disc_engine) -> None:
    """This rank's share of both engines (weights, optimizer state) under `folder/deepspeed`."""
    refiner_engine.save_checkpoint(os.path.join(folder, "deepspeed", "refiner"), tag=DS_TAG)
    disc_engine.save_checkpoint(os.path.join(folder, "deepspeed", "discriminator"), tag=DS_TAG)


def load_engines(folder: str, refiner_engine, disc_engine) -> None:
    refiner_engine.load_checkpoint(os.path.join(folder, "deepspeed", "refiner"), tag=DS_TAG)
    disc_engine.load_checkpoint(os.path.join(folder, "deepspeed", "discriminator"), tag=DS_TAG)


def load_as_data(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files as data.

    DeepSpeed 0.19 loads them with `torch.load(weights_only=False)`, which runs any code
    pickled into a file; `load_data` refuses such a file. ZeRO optimizer files also hold
    a loss scaler, the ZeRO stage enum and fragment addresses: plain data classes,
    allowed by name.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from simgan_dist.train.checkpoint import load_data

    def load(path: str, map_location: Any = None) -> Any:
        return load_data(path, f"DeepSpeed checkpoint file {os.path.basename(path)}", map_location,
                         allowed=(LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address))

    _replace_checkpoint_file_loader(engine, load)


def _replace_checkpoint_file_loader(engine, load) -> None:
    """DeepSpeed internals, checked on deepspeed==0.19.8: every checkpoint file an engine reads
    (model states, optimizer partitions) goes through `engine.checkpoint_engine.load`, and there is
    no public hook for how files are deserialised."""
    engine.checkpoint_engine.load = load


def _skip_gradient_allreduce(engine) -> None:
    """DeepSpeed internals, checked on deepspeed==0.19.8: `engine.backward` all-reduces gradients
    while the engine's `enable_backward_allreduce` flag is set; no public option turns it off."""
    engine.enable_backward_allreduce = False
