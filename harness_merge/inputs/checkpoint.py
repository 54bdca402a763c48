"""Full fine-tuned checkpoints -> per-tensor task vectors ``tau_i = theta_i - theta_0``.

Checkpoints are safetensors model folders (single file or sharded with
``model.safetensors.index.json``). Tensors are read one name at a time from
memory-mapped files, so memory holds about N+1 copies of one tensor. A method
that does not need the base (``params.needs_base()`` False: wa at lambda 1)
reads the fine-tuned weights only (``read_fine_tuned``); the base's headers are
still checked.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputError
from ..types import ModuleInputs
from .files import TensorFile, checked_float

INDEX = "model.safetensors.index.json"
log = logging.getLogger("harness_merge")

# Tensors that are not linear maps: the same policy for every method (see
# ``harness_merge.merge_loop``): their task vectors are averaged.
_EMBEDDING_LIKE = re.compile(
    r"(embed_tokens|embed_positions|word_embeddings|position_embedding|wte|wpe|lm_head|patch_embed)"
)


def is_checkpoint_dir(d: Path) -> bool:
    d = Path(d)
    return (d / "config.json").is_file() and ((d / INDEX).is_file() or any(d.glob("*.safetensors")))


class Checkpoint:
    """Name -> file map of one safetensors checkpoint folder."""

    def __init__(self, ref: str, path: Path):
        self.ref, self.path = ref, Path(path)
        idx = self.path / INDEX
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise InputError(f"{idx}: unreadable shard index ({e})") from None
            self.file_names = sorted(set(weight_map.values()))
        else:
            self.file_names = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = None
        if not self.file_names:
            bins = list(self.path.glob("*.bin"))
            hint = " (found .bin files: convert them to safetensors)" if bins else ""
            raise InputError(f"{ref}: no *.safetensors weights in {self.path}{hint}")
        self._files: dict[str, TensorFile] = {}
        self.where: dict[str, str] = {}
        for fn in self.file_names:
            if not (self.path / fn).is_file():
                raise InputError(f"{ref}: shard {fn} listed in {INDEX} is missing")
            for k in self._file(fn).keys():
                self.where[k] = fn
        if weight_map is not None and set(weight_map) != set(self.where):
            odd = sorted(set(weight_map) ^ set(self.where))[:3]
            raise InputError(f"{ref}: {INDEX} disagrees with the shards' contents, e.g. {odd}")

    def _file(self, fn: str) -> TensorFile:
        if fn not in self._files:
            self._files[fn] = TensorFile(self.path / fn)
        return self._files[fn]

    @property
    def files(self) -> list[Path]:
        extra = [self.path / INDEX] if (self.path / INDEX).is_file() else []
        return [self.path / "config.json", *extra, *(self.path / f for f in self.file_names)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self.where[name]).shape(name)

    def dtype(self, name: str) -> str:
        return self._file(self.where[name]).dtype(name)

    def get(self, name: str):
        return self._file(self.where[name]).get(name)


class CheckpointSet:
    """N fine-tuned checkpoints and their base, checked to have the same tensors."""

    kind = "dense"

    def __init__(self, refs: list[str], dirs: list[Path], *, base_ref: str, base_dir: Path):
        self.base = Checkpoint(base_ref, base_dir)
        self.checkpoints = [Checkpoint(r, d) for r, d in zip(refs, dirs)]
        names = set(self.base.where)
        for ck in self.checkpoints:
            missing = sorted(names - set(ck.where))
            extra = sorted(set(ck.where) - names)
            if missing or extra:
                eg = f"lacks {missing[0]}" if missing else f"has {extra[0]} which the base lacks"
                raise InputError(
                    f"{ck.ref}: tensors differ from the base {base_ref} ({len(missing)} missing, "
                    f"{len(extra)} extra; e.g. it {eg}): not the same architecture?"
                )
            for n in self.base.where:
                if ck.shape(n) != self.base.shape(n):
                    raise InputError(
                        f"tensor {n}: shape {list(ck.shape(n))} in {ck.ref} but "
                        f"{list(self.base.shape(n))} in the base {base_ref}"
                    )
        mixed = {}
        for ck in self.checkpoints:
            odd = next((n for n in self.base.where if ck.dtype(n) != self.base.dtype(n)), None)
            if odd is not None:
                mixed[ck.ref] = f"{odd}: {ck.dtype(odd)} vs {self.base.dtype(odd)}"
        if mixed:
            log.warning(
                "checkpoint dtypes differ from the base's (%s): task vectors are computed in float32 and "
                "full-weight outputs keep the base's dtype per tensor",
                "; ".join(f"{r}: {d}" for r, d in mixed.items()),
            )

    @property
    def refs(self) -> list[str]:
        return [c.ref for c in self.checkpoints]

    @property
    def files(self) -> list[list[Path]]:
        return [c.files for c in self.checkpoints]

    @property
    def module_names(self) -> list[str]:
        """Tensor names in the base's shard order (so a writer can stream by shard)."""
        order = {fn: i for i, fn in enumerate(self.base.file_names)}
        return sorted(self.base.where, key=lambda n: (order[self.base.where[n]], n))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def is_matrix(self, name: str) -> bool:
        return len(self.base.shape(name)) == 2 and not _EMBEDDING_LIKE.search(name)

    def weight_dtype(self) -> str:
        n = next(iter(self.base.where))
        return self.base.dtype(n)

    def layout_names(self) -> list[str]:
        """Tensor names in the first fine-tuned checkpoint's shard order: the
        layout of a merge that does not read the base."""
        first = self.checkpoints[0]
        order = {fn: i for i, fn in enumerate(first.file_names)}
        return sorted(first.where, key=lambda n: (order[first.where[n]], n))

    def unchanged(self, name: str, *, base_free: bool = False) -> bool | None:
        """Whether every fine-tuned checkpoint holds the base's tensor ``name``
        (``base_free``: the first checkpoint's) value for value: ``torch.equal``
        on the stored tensors, which stops at the first difference (no float32
        copy, no task vector). The same answer as "every ``tau_n`` is all
        zeros" for finite weights (None where the dtypes differ: then compare the
        float32 values); where it is True, the reference tensor is
        still checked for NaN/Inf (a non-finite weight is refused either way)."""
        ref = self.checkpoints[0] if base_free else self.base
        others = self.checkpoints[1:] if base_free else self.checkpoints
        if any(c.dtype(name) != ref.dtype(name) for c in others):
            return None  # mixed dtypes: compared as float32 task vectors by the caller
        t = ref.get(name)
        if not all(torch.equal(c.get(name), t) for c in others):
            return False
        checked_float(t, f"{ref.ref} [{name}]", stored_dtype=True)
        return True

    def _float(self, ck: Checkpoint, name: str) -> torch.Tensor:
        """A float32 copy of ``ck``'s tensor (never the stored tensor itself,
        so the caller may work in place), checked for NaN/Inf."""
        x = ck.get(name).to(torch.float32, copy=True)
        return checked_float(x, f"{ck.ref} [{name}]", stored_dtype=True)

    def read_fine_tuned(self, name: str) -> tuple:
        """float32 ``theta_n`` of every fine-tuned checkpoint, the base untouched."""
        return tuple(self._float(c, name) for c in self.checkpoints)

    def read(self, name: str) -> ModuleInputs:
        """float32 ``tau_n = theta_n - theta_0``, each subtracted in place in
        its float32 copy (no second temporary): the same values as
        ``float(theta_n) - float(theta_0)``."""
        base = checked_float(self.base.get(name), f"{self.base.ref} [{name}]")
        taus = tuple(self._float(c, name).sub_(base) for c in self.checkpoints)
        return ModuleInputs(name=name, task_vectors=taus, base=base)

    @staticmethod
    def _blocks_of(cks, name: str, bounds) -> Iterator[list[torch.Tensor]]:
        """For each ``(start, stop)`` of ``bounds``: a float32 copy of the flat
        entries ``[start, stop)`` of every checkpoint's tensor, the rows of one
        ``(len(cks), stop - start)`` buffer (each stored tensor fetched once;
        :func:`stacked_rows` gives the buffer of consecutive rows back); a
        non-finite entry raises as
        :func:`checked_float` on the whole tensor (the same message, counting
        all of it)."""
        stored = [ck.get(name) for ck in cks]
        flat = [t.reshape(-1) for t in stored]
        for start, stop in bounds:
            rows = torch.empty((len(cks), stop - start), dtype=torch.float32)  # one buffer, row per input
            for ck, t, f, x in zip(cks, stored, flat, rows):
                x.copy_(f[start:stop])  # the exact widening of .to(torch.float32)
                if not math.isfinite(float(x.sum())) and not torch.isfinite(x).all():
                    checked_float(t, f"{ck.ref} [{name}]")
            yield list(rows.unbind(0))

    def read_blocks(self, name: str, bounds) -> Iterator[ModuleInputs]:
        """:meth:`read` in flat blocks: for each ``(start, stop)`` of
        ``bounds``, the entries ``[start, stop)`` (1-D task vectors and base,
        the same float32 values), for a pointwise method run block by block
        (``merge_loop.iter_merged(blockwise=True)``)."""
        for base, *thetas in self._blocks_of([self.base, *self.checkpoints], name, bounds):
            taus = tuple(t.sub_(base) for t in thetas)
            yield ModuleInputs(name=name, task_vectors=taus, base=base)

    def read_fine_tuned_blocks(self, name: str, bounds) -> Iterator[tuple]:
        """:meth:`read_fine_tuned` in flat blocks (as :meth:`read_blocks`)."""
        for thetas in self._blocks_of(self.checkpoints, name, bounds):
            yield tuple(thetas)


def stacked_rows(tensors) -> torch.Tensor | None:
    """The contiguous ``(N, *shape)`` tensor whose consecutive rows
    ``tensors`` are (as the blocks of :meth:`CheckpointSet.read_blocks` come),
    or None: ``torch.stack(tensors)`` would copy them into that same layout."""
    tensors = tuple(tensors)
    if not tensors or tensors[0]._base is None or not tensors[0].numel():
        return None
    whole, first, n = tensors[0]._base, tensors[0], len(tensors)
    if not (whole.is_contiguous() and first.is_contiguous() and whole.dim() == first.dim() + 1):
        return None
    if any(t._base is not whole or t.shape != first.shape for t in tensors):
        return None
    step = first.numel() * first.element_size()
    if any(t.data_ptr() != first.data_ptr() + i * step for i, t in enumerate(tensors)):
        return None
    i0 = (first.data_ptr() - whole.data_ptr()) // step
    if (first.data_ptr() - whole.data_ptr()) % step or i0 + n > whole.shape[0]:
        return None
    return whole[i0 : i0 + n]
