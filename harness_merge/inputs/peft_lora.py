"""PEFT LoRA adapter folders -> per-module ``LoRAFactors``.

Names, shapes and dtypes come from :func:`.headers.lora_header` (no tensor read);
this module refuses what a LoRA merge cannot hold and reads the factors.

Per target module: ``A (r x d_in)``, ``B (d_out x r)`` and the effective scale
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with
PEFT's per-module ``rank_pattern`` / ``alpha_pattern`` resolved by PEFT's own
matcher. The rank is read from the tensor shapes. Nothing is loaded until
``read(module)``; safetensors files are memory-mapped.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..errors import InputError
from ..types import LoRAFactors, ModuleInputs
from .files import TensorFile, checked_float
from .headers import CONFIG, WEIGHT_FILES, LoraHeader, ModuleShape, lora_header, read_adapter_config

log = logging.getLogger("harness_merge")


def is_lora_dir(d: Path) -> bool:
    return (Path(d) / CONFIG).is_file()


class LoRAAdapter:
    """One PEFT LoRA adapter folder, validated on open.

    DoRA adapters are read by the subclass in :mod:`.dora` (``allows_dora``);
    this class refuses them.
    """

    allows_dora = False

    def __init__(self, ref: str, path: Path):
        self.ref, self.path = ref, Path(path)
        cfg_path = self.path / CONFIG
        self.config = read_adapter_config(self.path)
        self._check_config(cfg_path)
        wf = next((self.path / f for f in WEIGHT_FILES if (self.path / f).is_file()), None)
        if wf is None:
            raise InputError(f"{ref}: no {' or '.join(WEIGHT_FILES)} in {self.path}")
        self.weights_file = wf
        self.header: LoraHeader = lora_header(self.path, self._module_name, config=self.config)
        self._file = TensorFile(wf)
        self.modules: dict[str, ModuleShape] = self._index()
        self._check_ranks(cfg_path)

    @property
    def files(self) -> list[Path]:
        return [self.path / CONFIG, self.weights_file]

    def _check_config(self, cfg_path: Path) -> None:
        c = self.config
        ptype = str(c.get("peft_type", "")).upper()
        if ptype != "LORA":
            raise InputError(
                f"{cfg_path}: peft_type is {c.get('peft_type')!r}; only LoRA adapters can be merged "
                f"(other PEFT types have no A/B factors)"
            )
        if c.get("use_dora") and not self.allows_dora:
            raise InputError(
                f"{cfg_path}: DoRA adapter (use_dora=true); its magnitude vectors make the update "
                f"non-linear in A/B, so LoRA merge formulas would be silently wrong - refused"
            )
        if c.get("lora_bias"):
            raise InputError(
                f"{cfg_path}: lora_bias=true is not supported (the bias update would be dropped)"
            )
        if c.get("modules_to_save"):
            raise InputError(
                f"{cfg_path}: modules_to_save={c['modules_to_save']} (full trained modules) is not "
                f"supported yet; merging only the LoRA factors would silently drop them"
            )
        for k in ("r", "lora_alpha"):
            if k not in c:
                raise InputError(f"{cfg_path}: missing {k!r}")

    def _index(self) -> dict[str, ModuleShape]:
        """The header's modules, after refusing what a LoRA merge would drop."""
        h = self.header
        refused = list(h.other) + ([] if self.allows_dora else list(h.magnitude_keys.values()))
        for key in sorted(refused):
            if "lora_embedding_" in key:
                raise InputError(f"{self.weights_file}: {key}: LoRA on embeddings is not supported")
            if "lora_magnitude_vector" in key:
                raise InputError(f"{self.weights_file}: {key}: DoRA weights are not supported")
            raise InputError(
                f"{self.weights_file}: unexpected tensor {key!r} (not a LoRA factor); merging would drop it"
            )
        if not h.a_keys:
            raise InputError(f"{self.weights_file}: no lora_A/lora_B tensors found")
        if set(h.a_keys) != set(h.b_keys):
            odd = sorted(set(h.a_keys) ^ set(h.b_keys))[:3]
            raise InputError(f"{self.weights_file}: modules with only one of lora_A/lora_B: {odd}")
        self._a_keys, self._b_keys = h.a_keys, h.b_keys
        for m in sorted(h.a_keys):
            why = h.bad_factor(m)
            if why is not None:
                raise InputError(f"{self.weights_file}: module {m}: {why}")
        return dict(h.modules)

    def config_rank(self, module: str) -> int:
        """``r`` of ``module`` as PEFT reads it (``rank_pattern`` resolved)."""
        from peft.utils.other import get_pattern_key

        r = self.config["r"]
        pattern = self.config.get("rank_pattern") or {}
        if pattern:
            key = get_pattern_key(list(pattern), module)
            r = pattern.get(key, r)
        return int(r)

    def _check_ranks(self, cfg_path: Path) -> None:
        """PEFT builds each module with the config's rank and refuses tensors of
        another; the scale alpha/r would also be computed with the wrong r."""
        for m, s in self.modules.items():
            want = self.config_rank(m)
            if want != s.rank:
                src = (
                    "rank_pattern"
                    if (self.config.get("rank_pattern") or {}) and want != int(self.config["r"])
                    else "r"
                )
                raise InputError(
                    f"{cfg_path}: module {m}: {src} = {want} in the config, but its tensors in "
                    f"{self.weights_file.name} have rank {s.rank}; PEFT refuses this adapter - fix "
                    f"'r' / 'rank_pattern' in adapter_config.json"
                )

    def _module_name(self, peft_name: str) -> str:
        """The module name used downstream for a PEFT module name (a subclass maps layouts)."""
        return peft_name

    def scale(self, module: str) -> float:
        """``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) with the per-module patterns."""
        from peft.utils.other import get_pattern_key

        r = self.modules[module].rank
        alpha_pattern = self.config.get("alpha_pattern") or {}
        alpha = float(self.config["lora_alpha"])
        if alpha_pattern:
            key = get_pattern_key(list(alpha_pattern), module)
            alpha = float(alpha_pattern.get(key, alpha))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def read(self, module: str, *, stored_dtype: bool = False) -> LoRAFactors:
        """The module's factors in float32 (``stored_dtype``: as stored), checked finite."""
        where = f"{self.weights_file} [{module}]"
        A = checked_float(self._file.get(self._a_keys[module]), where + " lora_A", stored_dtype=stored_dtype)
        B = checked_float(self._file.get(self._b_keys[module]), where + " lora_B", stored_dtype=stored_dtype)
        return LoRAFactors(A=A, B=B, scale=self.scale(module))

    def weight_dtype(self) -> str:
        return self.header.tensors[next(iter(self._a_keys.values()))].dtype

    def dtypes(self) -> set[str]:
        """Every dtype among the adapter's factors (read from the file header)."""
        return {self.header.tensors[k].dtype for keys in (self._a_keys, self._b_keys) for k in keys.values()}


class LoRASet:
    """N LoRA adapters checked to target the same modules with the same shapes."""

    kind = "lora"
    adapter_cls = LoRAAdapter

    def __init__(self, refs: list[str], dirs: list[Path]):
        self.adapters = [self.adapter_cls(r, d) for r, d in zip(refs, dirs)]
        first = self.adapters[0]
        for ad in self.adapters[1:]:
            missing = sorted(set(first.modules) - set(ad.modules))
            extra = sorted(set(ad.modules) - set(first.modules))
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"missing {len(missing)} module(s) of {first.ref}, e.g. {missing[0]}")
                if extra:
                    parts.append(f"has {len(extra)} module(s) {first.ref} lacks, e.g. {extra[0]}")
                raise InputError(f"{ad.ref}: target modules disagree: " + "; ".join(parts))
            for m, s in first.modules.items():
                t = ad.modules[m]
                if (s.d_out, s.d_in) != (t.d_out, t.d_in):
                    raise InputError(
                        f"module {m}: shape (d_out, d_in) = {(s.d_out, s.d_in)} in {first.ref} "
                        f"but {(t.d_out, t.d_in)} in {ad.ref}"
                    )
        bases = {a.ref: a.config.get("base_model_name_or_path") for a in self.adapters}
        if len(set(bases.values())) > 1:
            log.warning(
                "the adapters name different base models (base_model_name_or_path): %s; merging them "
                "assumes they were trained on the same base",
                ", ".join(f"{r}: {b!r}" for r, b in bases.items()),
            )

    @property
    def refs(self) -> list[str]:
        return [a.ref for a in self.adapters]

    @property
    def files(self) -> list[list[Path]]:
        return [a.files for a in self.adapters]

    @property
    def module_names(self) -> list[str]:
        return list(self.adapters[0].modules)

    def ranks(self, module: str) -> list[int]:
        return [a.modules[module].rank for a in self.adapters]

    def shape(self, module: str) -> tuple[int, int]:
        s = self.adapters[0].modules[module]
        return (s.d_out, s.d_in)

    def is_matrix(self, module: str) -> bool:
        return True

    def weight_dtype(self) -> str:
        """The output dtype when none is asked for: the adapters' dtype when they
        all share one; for mixed dtypes (fp16 with bf16, or with fp32, ...)
        float32, which holds every input exactly - with a warning."""
        per = {a.ref: a.dtypes() for a in self.adapters}
        every = set().union(*per.values())
        if len(every) == 1:
            return next(iter(every))
        log.warning(
            "the adapters mix dtypes (%s): writing float32, which holds each of them exactly; pass "
            "--dtype (dtype=...) to choose another",
            ", ".join(f"{r}: {'/'.join(sorted(d))}" for r, d in per.items()),
        )
        return "float32"

    def base_model_name(self) -> str | None:
        return self.adapters[0].config.get("base_model_name_or_path")

    def read(self, module: str, *, stored_dtype: bool = False) -> ModuleInputs:
        """Every adapter's factors of ``module``; float32 unless ``stored_dtype``
        (for methods registered with ``stored_dtype=True``)."""
        return ModuleInputs(
            name=module, lora=tuple(a.read(module, stored_dtype=stored_dtype) for a in self.adapters)
        )
