"""In-memory description of one module's inputs and one module's merge result.

These are the only types that cross the layer boundaries (inputs -> methods ->
artifact); they hold tensors and nothing else, no file handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Union

import torch


@dataclass(frozen=True)
class LoRAFactors:
    """One adapter's factors for one module: ``delta = scale * B @ A``.

    ``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``; ``scale`` is ``alpha / r``
    (or ``alpha / sqrt(r)`` for rsLoRA), already resolved per module.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def B_scaled(self) -> torch.Tensor:
        """``scale * B``: folding the scale into B makes adapters of different
        rank/alpha comparable (``delta = B_scaled @ A``)."""
        return self.B * self.scale

    def delta(self) -> torch.Tensor:
        """The dense update ``scale * B @ A`` (d_out x d_in)."""
        return self.B_scaled @ self.A


@dataclass(frozen=True)
class ModuleInputs:
    """Everything a method sees for one module of N inputs.

    Exactly one of ``lora`` (LoRA adapters) or ``task_vectors`` (full
    fine-tuned checkpoints, ``tau_i = theta_i - theta_0``) is set.
    ``base`` is the pre-trained weight when the caller has it (optional).
    """

    name: str
    lora: tuple[LoRAFactors, ...] | None = None
    task_vectors: tuple[torch.Tensor, ...] | None = None
    base: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.lora is None) == (self.task_vectors is None):
            raise ValueError(f"{self.name}: exactly one of lora / task_vectors must be given")

    @property
    def kind(self) -> Literal["lora", "dense"]:
        return "lora" if self.lora is not None else "dense"

    @property
    def n(self) -> int:
        return len(self.lora if self.lora is not None else self.task_vectors)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.lora is not None:
            return (self.lora[0].B.shape[0], self.lora[0].A.shape[1])
        return tuple(self.task_vectors[0].shape)

    def deltas(self) -> list[torch.Tensor]:
        """Dense per-input updates (materialised for this module only)."""
        if self.lora is not None:
            return [f.delta() for f in self.lora]
        return list(self.task_vectors)


@dataclass(frozen=True)
class LowRank:
    """A merged update kept in factor form: ``delta = B @ A`` (scale folded in)."""

    A: torch.Tensor
    B: torch.Tensor
    info: dict = field(default_factory=dict, compare=False)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.B @ self.A


@dataclass(frozen=True)
class Dense:
    """A merged update as a dense tensor (same shape as the module's weight)."""

    delta: torch.Tensor
    info: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DenseBlocks:
    """A merged dense result delivered in flat blocks: ``blocks()`` yields
    float32 1-D tensors whose concatenation, reshaped to ``shape``, is the
    result (``merge_loop.iter_merged(blockwise=True)``, for a writer that
    streams them: no whole-module temporaries). ``info`` as ``Dense``."""

    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[torch.Tensor]]
    info: dict = field(default_factory=dict, compare=False)

    @property
    def delta(self) -> torch.Tensor:
        """The whole result (joined blocks), for a consumer that needs it."""
        return torch.cat(list(self.blocks())).reshape(self.shape)


@dataclass(frozen=True)
class DoRAUpdate:
    """A merged DoRA module: the direction update (``LowRank`` or ``Dense``,
    scale folded in) and the merged magnitude ``m`` (``d_out``); the weight is
    ``m * (W0 + delta) / ||W0 + delta||_row`` (see :mod:`harness_merge.merge_dora`)."""

    direction: LowRank | Dense
    magnitude: torch.Tensor
    info: dict = field(default_factory=dict, compare=False)

    def direction_delta(self) -> torch.Tensor:
        d = self.direction
        return d.delta if isinstance(d, Dense) else d.delta()

    def weight(self, W0: torch.Tensor) -> torch.Tensor:
        """``m * (W0 + delta) / ||W0 + delta||_row`` in float32 (a zero row stays zero)."""
        V = W0.float() + self.direction_delta().float()
        norm = torch.linalg.norm(V, dim=1)
        factor = torch.where(
            norm > 0, self.magnitude.float() / norm.clamp_min(torch.finfo(V.dtype).tiny), 0.0
        )
        return factor.unsqueeze(1) * V


@dataclass(frozen=True)
class Replacement:
    """A merged parameter that replaces the base's value outright (not an
    update): e.g. the averaged ``mm_projector`` of LLaVA-repo checkpoints."""

    value: torch.Tensor
    info: dict = field(default_factory=dict, compare=False)


MergeResult = Union[LowRank, Dense]
