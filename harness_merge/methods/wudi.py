"""WUDI merging and WUDI v2: a merged update fitted to the task vectors.

Both minimise a quadratic loss of the merged update ``tau_m``::

    L(tau_m) = sum_i a_i ||(tau_m - T_i) P_i||_F^2,   a_i = w_i / ||tau_i||_F^2

(WUDI: ``T_i = tau_i``, ``P_i = tau_i^T``; WUDI v2: ``T_i`` a rank-k
approximation of ``tau_i`` and ``P_i = V_k Sigma_k``). Stacking
``P = [sqrt(a_i) P_i]`` and ``R = [sqrt(a_i) T_i P_i]`` gives
``L = ||tau_m P - R||_F^2`` with gradient ``2 (tau_m G - H)``, ``G = P P^T``,
``H = R P^T``. The loss is basis-equivariant, so on LoRA inputs everything runs
on the ``(N r x N r)`` cores of :mod:`._lowrank`; SGD (with momentum) and the
closed form then give exactly the dense result, Adam does not (it is
element-wise, so its trajectory depends on the basis; see ``space``).

Cost: a dense iterative run costs about ``iterations * 2 d_out d_in min(d_in,
2K)`` flops per module (``K`` the stacked width); :meth:`_WudiBase.plan_note`
states it, with this machine's measured matmul rate, before a merge starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import MergeError, MethodParamError
from ..types import MergeResult, ModuleInputs
from . import register
from ._lowrank import lift, module_cores, rank_rtol, truncated
from ._params import MethodParams

Space = Literal["auto", "factor", "dense"]


@dataclass(frozen=True)
class _WudiBase(MethodParams):
    iterations: int = 300
    lr: float | None = None
    optimizer: Literal["auto", "adam", "sgd"] = "auto"
    momentum: float = 0.9
    init: Literal["auto", "sum", "mean"] = "auto"
    solver: Literal["iterative", "closed_form"] = "iterative"
    space: Space = "auto"
    device: Literal["cpu", "cuda"] = "cpu"

    def validate(self) -> None:
        if self.iterations < 1:
            self._bad("iterations", self.iterations, "must be >= 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            self._bad("lr", self.lr, "must be a positive number")
        if not 0.0 <= self.momentum < 1.0:
            self._bad("momentum", self.momentum, "must be in [0, 1)")
        if self.weights is not None and any(w < 0 for w in self.weights):
            self._bad("weights", list(self.weights), "must be >= 0 (they weight loss terms)")
        if self.device == "cuda" and not torch.cuda.is_available():
            self._bad(
                "device",
                self.device,
                "is not available on this machine; use device=cpu",
            )

    # resolved per input kind -------------------------------------------------
    def resolved(self, kind: str) -> dict:
        raise NotImplementedError

    def runs_dense(self, kind: str) -> bool:
        """Whether the optimisation runs on the full ``d_out x d_in`` matrix.

        ``space=auto``: factor space on LoRA only where it gives the dense
        result exactly (SGD or the closed form, which are basis-equivariant),
        dense for Adam (element-wise, so its trajectory depends on the basis)."""
        if kind != "lora" or self.space == "dense":
            return True
        if self.space == "factor":
            return False
        return self.solver == "iterative" and self.resolved(kind)["optimizer"] == "adam"

    @classmethod
    def listing_note(cls) -> str | None:
        note = cls().plan_note("lora", [(4096, 4096)], 3)
        return f"cost of the defaults, one 4096x4096 module of 3 LoRA adapters: {note}" if note else None

    def plan_note(self, kind: str, shapes: list[tuple[int, ...]], n_inputs: int) -> str | None:
        """What an iterative dense run costs, said before it starts (None when cheap)."""
        if self.solver != "iterative" or not self.runs_dense(kind):
            return None
        mats = [s for s in shapes if len(s) == 2]
        flops = 0.0
        for d_out, d_in in mats:
            width = n_inputs * (d_out if self.method == "wudi" else max(1, min(d_out, d_in) // n_inputs))
            flops += self.iterations * 2.0 * d_out * d_in * min(d_in, 2 * width)
        if flops < 5e10:  # well under a minute anywhere
            return None
        rate = _matmul_rate(self.device)
        secs = flops / rate
        where = "GPU" if self.device == "cuda" else "CPU"
        hint = (" device=cuda runs it on a GPU;" if self.device == "cpu" else "") + (
            " space=factor is the cheap (not faithful) LoRA variant"
            if kind == "lora" and self.method == "wudi"
            else ""
        )
        return (
            f"{self.method}: {self.iterations} {self.resolved(kind)['optimizer']} steps on {len(mats)} dense "
            f"{'matrix' if len(mats) == 1 else 'matrices'}: ~{flops / 1e12:.3g} TFLOP, about {_human(secs)} on this {where} "
            f"(measured {rate / 1e9:.0f} GFLOP/s).{hint}"
        )


@dataclass(frozen=True)
class WudiParams(_WudiBase):
    """WUDI defaults from the released code: Adam, lr 1e-5, 300 iterations,
    initialised at the sum of the task vectors, no rescaling (scaling 1.0).

    space: ``dense`` (default) materialises LoRA deltas and runs Adam on the
    full matrix, the released code's trajectory (returns ``Dense``);
    ``factor`` runs it on the factor-space coordinates of LoRA inputs (cheap,
    returns ``LowRank``; ``auto`` does so only for SGD or the closed form,
    which give the dense result exactly): Adam is element-wise, so this is a
    different, basis-dependent optimisation (measured: relative gap 0.21 to
    dense, final loss 1.93e-2 vs 1.19e-2, issue 11). Checkpoints are dense.
    device: ``cuda`` runs the optimisation on a GPU (the released code does).
    """

    method: ClassVar[str] = "wudi"
    space: Space = "dense"

    def resolved(self, kind: str) -> dict:
        opt = "adam" if self.optimizer == "auto" else self.optimizer
        lr = self.lr if self.lr is not None else (1e-5 if opt == "adam" else 1e-4)
        return {
            "optimizer": opt,
            "lr": lr,
            "init": "sum" if self.init == "auto" else self.init,
            "center": False,
        }


_WUDI2_RECIPES = {
    # MLLMerging LLaMA-Factory/model_merging.py:wudi_merging2 (Qwen2-VL experts)
    "qwen2vl": {"optimizer": "sgd", "lr": 1e-4, "init": "mean", "center": False},
    # MLLMerging InternVL/internvl_chat/model_merging.py:wudi_merging2
    "internvl": {"optimizer": "adam", "lr": 1e-5, "init": "sum", "center": True},
}


@dataclass(frozen=True)
class Wudi2Params(_WudiBase):
    """WUDI v2 (paper 004). recipe: the released script whose settings the
    ``auto`` values take:

    - ``qwen2vl`` (default; ``LLaMA-Factory/model_merging.py:wudi_merging2``,
      the Qwen2-VL experts of the paper's main tables): SGD momentum 0.9,
      lr 1e-4, mean init, uncentred targets;
    - ``internvl`` (``InternVL/internvl_chat/model_merging.py``): Adam, lr
      1e-5, sum init, centred targets;
    - ``by_input`` (our former default): ``qwen2vl`` for LoRA adapters,
      ``internvl`` for full checkpoints (measured: relative gap 1.68 to the
      default for LoRA-born deltas given as checkpoints, issue 11).

    The released scripts pick by model family, not by input kind: the
    Qwen2-VL experts are full checkpoints. Explicit ``optimizer``, ``lr``,
    ``init``, ``center`` override the recipe.
    rank: k of the low-rank approximation; None = ``min(m, n) // N`` (the
    released code), always capped at each task vector's numerical rank.
    center: subtract the mean task vector before the low-rank approximation of
    the targets.
    """

    method: ClassVar[str] = "wudi2"

    rank: int | None = None
    center: Literal["auto", "yes", "no"] = "auto"
    recipe: Literal["qwen2vl", "internvl", "by_input"] = "qwen2vl"

    def validate(self) -> None:
        super().validate()
        if self.rank is not None and self.rank < 1:
            self._bad("rank", self.rank, "must be >= 1")

    def resolved(self, kind: str) -> dict:
        name = self.recipe
        if name == "by_input":
            name = "qwen2vl" if kind == "lora" else "internvl"
        r = _WUDI2_RECIPES[name]
        opt = self.optimizer if self.optimizer != "auto" else r["optimizer"]
        if self.lr is not None:
            lr = self.lr
        else:
            lr = r["lr"] if opt == r["optimizer"] else (1e-4 if opt == "sgd" else 1e-5)
        init = self.init if self.init != "auto" else r["init"]
        center = r["center"] if self.center == "auto" else self.center == "yes"
        return {"optimizer": opt, "lr": lr, "init": init, "center": center}


_RATE: dict[str, float] = {}


def _matmul_rate(device: str) -> float:
    """flop/s of a float32 matmul on ``device``, measured once per process."""
    if device not in _RATE:
        import time

        dev = torch.device(device)
        a = torch.randn(512, 512, device=dev)
        (a @ a).sum().item()
        t0 = time.perf_counter()
        for _ in range(4):
            b = a @ a
        b.sum().item()
        _RATE[device] = max(4 * 2 * 512**3 / (time.perf_counter() - t0), 1e8)
    return _RATE[device]


def _human(secs: float) -> str:
    if secs < 120:
        return f"{secs:.0f} s"
    if secs < 7200:
        return f"{secs / 60:.0f} min"
    return f"{secs / 3600:.1f} h"


# --------------------------------------------------------------------------- problem
@dataclass
class Problem:
    """``min_X sum_i a_i ||(X - T_i) P_i||_F^2`` in the coordinates of a frame."""

    targets: list[torch.Tensor]
    inputs: list[torch.Tensor]  # P_i, (b x k_i)
    coefs: list[float]
    init: torch.Tensor

    def width(self) -> int:
        """Total width ``K = sum_i k_i`` of the stacked ``P``."""
        return sum(p.shape[1] for p, a in zip(self.inputs, self.coefs) if a != 0.0)

    def stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``P = [sqrt(a_i) P_i]`` (b x K) and ``R = [sqrt(a_i) T_i P_i]`` (a x K)."""
        ps, rs = [], []
        for t, p, a in zip(self.targets, self.inputs, self.coefs):
            if a == 0.0 or p.shape[1] == 0:
                continue
            sa = math.sqrt(a)
            ps.append(p.to(dtype) * sa)
            rs.append((t.to(dtype) @ p.to(dtype)) * sa)
        if not ps:
            a_, b_ = self.init.shape
            return torch.zeros(b_, 0, dtype=dtype), torch.zeros(a_, 0, dtype=dtype)
        return torch.cat(ps, 1), torch.cat(rs, 1)

    def normal_equations(
        self, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``G = sum_i a_i P_i P_i^T`` (b x b) and ``H = sum_i a_i T_i P_i P_i^T``
        (a x b), accumulated task by task (never the (a x K) stack), on ``device``."""
        a_, b_ = self.init.shape
        G = torch.zeros(b_, b_, dtype=dtype, device=device)
        H = torch.zeros(a_, b_, dtype=dtype, device=device)
        for t, p, a in zip(self.targets, self.inputs, self.coefs):
            if a == 0.0 or p.shape[1] == 0:
                continue
            p, t = p.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)
            if p.shape[1] > p.shape[0]:
                gi = p @ p.T
                G += a * gi
                H += a * (t @ gi)
            else:
                G += a * (p @ p.T)
                H += a * ((t @ p) @ p.T)
        return G, H

    def loss(self, x: torch.Tensor) -> float:
        """The loss evaluated term by term (float64), as the papers write it."""
        total = 0.0
        for t, p, a in zip(self.targets, self.inputs, self.coefs):
            if a == 0.0:
                continue
            r = (x.double() - t.double()) @ p.double()
            total += a * float((r * r).sum())
        return total


def wudi_problem(
    cores: list[torch.Tensor],
    shape,
    weights,
    *,
    variant: str,
    init: str,
    center: bool,
    rank: int | None,
) -> Problem:
    """Build the WUDI (``variant='wudi'``) or WUDI v2 (``'wudi2'``) problem on
    the cores (dense deltas or factor-space cores)."""
    n = len(cores)
    w = list(weights) if weights is not None else [1.0] * n
    norms2 = [float((c.double() ** 2).sum()) for c in cores]
    coefs = [wi / nn if nn > 0 else 0.0 for wi, nn in zip(w, norms2)]
    if variant == "wudi":
        targets = list(cores)
        ps = [c.T for c in cores]
    else:
        k = rank if rank is not None else max(1, min(shape) // n)
        mean = torch.stack(cores).mean(0)
        targets, ps = [], []
        for c in cores:
            u, s, v = truncated(c, k, shape)  # input subspace from the uncentred tau_i
            ps.append(v * s)  # (Sigma_k V_k^T)^T
            if center:
                uc, sc, vc = truncated(c - mean, k, shape)
                targets.append((uc * sc) @ vc.T + mean)
            else:
                targets.append((u * s) @ v.T)
    x0 = torch.stack(cores).sum(0) if init == "sum" else torch.stack(cores).mean(0)
    return Problem(targets, ps, coefs, x0)


def solve_closed_form(prob: Problem, shape) -> torch.Tensor:
    """The minimiser nearest (Frobenius) to the init, i.e. the limit of gradient
    descent from it: ``X = X0 + (H - X0 G) G^+`` with ``G^+`` the pseudo-inverse
    over the eigenvalues above ``rank_rtol(shape)^2 * lambda_max`` (float64)."""
    G, H = prob.normal_equations(torch.float64)
    x0 = prob.init.double()
    lam, Q = torch.linalg.eigh(G)
    if lam.numel() == 0 or not float(lam.max()) > 0:
        return x0
    keep = lam > float(lam.max()) * rank_rtol(shape) ** 2
    Qk, lk = Q[:, keep], lam[keep]
    resid = H - x0 @ G
    return x0 + ((resid @ Qk) / lk) @ Qk.T


def _adam_steps(x: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8):
    """In-place Adam updates of ``x``, the arithmetic of ``torch.optim.Adam``
    with its defaults (no weight decay, no amsgrad)."""
    m, v, t = torch.zeros_like(x), torch.zeros_like(x), [0]
    b1, b2 = betas

    def step(g: torch.Tensor) -> None:
        t[0] += 1
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t[0])).add_(eps)
        x.addcdiv_(m, denom, value=-lr / (1 - b1 ** t[0]))

    return step


def _sgd_steps(x: torch.Tensor, lr: float, momentum: float):
    """In-place SGD with momentum, the arithmetic of ``torch.optim.SGD``
    (dampening 0, first step's buffer = gradient)."""
    buf: list[torch.Tensor] = []

    def step(g: torch.Tensor) -> None:
        if momentum > 0:
            if not buf:
                buf.append(g.clone())
            else:
                buf[0].mul_(momentum).add_(g)
            g = buf[0]
        x.add_(g, alpha=-lr)

    return step


def solve_iterative(
    prob: Problem,
    *,
    optimizer: str,
    lr: float,
    momentum: float,
    iterations: int,
    device: str,
    module: str,
) -> torch.Tensor:
    """Adam (default betas/eps) or SGD with momentum, as ``torch.optim``, on the
    loss, with the exact gradient ``2 (X G - H)`` (or ``2 (X P - R) P^T`` when
    the stack is narrower than ``X``), float32 as the released code."""
    dev = torch.device(device)
    if prob.width() > prob.init.shape[1]:  # fewer flops through the normal equations
        G, H = prob.normal_equations(torch.float32, dev)  # on the device: d_in^2 d_out flops per task
        P, R = None, None
    else:
        P, R = prob.stacked(torch.float32)
        P, R = P.to(dev), R.to(dev)
    x = prob.init.to(torch.float32).to(dev).clone()
    step = _adam_steps(x, lr) if optimizer == "adam" else _sgd_steps(x, lr, momentum)
    for _ in range(iterations):
        g = 2.0 * (x @ G - H) if P is None else 2.0 * ((x @ P - R) @ P.T)
        step(g)
    out = x.to("cpu")
    if not torch.isfinite(out).all():
        raise MergeError(
            f"{module}: the WUDI optimisation diverged ({optimizer}, lr={lr}); "
            f"lower lr or use solver=closed_form"
        )
    return out


def _merge(inputs: ModuleInputs, params: _WudiBase, variant: str) -> MergeResult:
    params.check_inputs(inputs.n)
    cfg = params.resolved(inputs.kind)
    if params.space == "factor" and inputs.kind != "lora":
        raise MethodParamError(
            f"{params.method}: space=factor needs LoRA inputs, {inputs.name} is a full checkpoint; "
            f"use space=auto"
        )
    frame, cores = module_cores(inputs, factor=not params.runs_dense(inputs.kind))
    prob = wudi_problem(
        cores,
        frame.shape,
        params.weights,
        variant=variant,
        init=cfg["init"],
        center=cfg["center"],
        rank=getattr(params, "rank", None),
    )
    if params.solver == "closed_form":
        x = solve_closed_form(prob, frame.shape)
    else:
        x = solve_iterative(
            prob,
            optimizer=cfg["optimizer"],
            lr=cfg["lr"],
            momentum=params.momentum,
            iterations=params.iterations,
            device=params.device,
            module=inputs.name,
        )
    x = x.to(cores[0].dtype)
    info = {"method": params.method, "solver": params.solver, **cfg}
    return lift(frame, x * params.scaling, info)


@register(
    "wudi",
    params=WudiParams,
    summary="WUDI: fit the merged update to the task vectors' input subspaces by Adam",
    reference_url="https://arxiv.org/abs/2503.08099",
    inputs=("lora", "dense"),
    min_inputs=2,
    lowrank_on_lora=lambda p: not p.runs_dense("lora"),
)
def wudi(inputs: ModuleInputs, params: WudiParams, *, generator: torch.Generator) -> MergeResult:
    """WUDI merging (Cheng et al., ICML 2025, "Whoever started the interference
    should end it").

    Formula: ``min_{tau_m} sum_i w_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2``
    by ``iterations`` steps of Adam (lr 1e-5) from ``tau_m = sum_i tau_i``;
    merged ``= scaling * tau_m``. ``solver=closed_form`` solves the normal
    equations ``tau_m G = H`` (``G = sum_i a_i tau_i^T tau_i``,
    ``H = sum_i a_i tau_i tau_i^T tau_i``) for the solution nearest the init.

    Reference: https://arxiv.org/abs/2503.08099

    Reference: ``wudi_merging`` of MLLMerging ``LLaMA-Factory/model_merging.py``
    (github.com/WalkerWorldPeace/MLLMerging): the defaults compute its loss,
    init, optimiser, lr and steps on the dense delta (LoRA deltas
    materialised), with the exact gradient in place of autograd.
    Variant: ``weights`` (default 1) multiply each task's loss term.
    ``space=factor`` runs Adam on the factor-space coordinates of LoRA inputs
    (cheap, returns ``LowRank``); its trajectory differs from dense Adam (gap
    in WudiParams). Dense runs cost ``iterations`` products with a
    ``d_in x d_in`` matrix per module: use ``device=cuda`` for real models
    (the merge states the cost before it starts). Deterministic.
    """
    return _merge(inputs, params, "wudi")


@register(
    "wudi2",
    params=Wudi2Params,
    summary="WUDI v2: WUDI with low-rank task inputs; recipe of the released Qwen2-VL (SGD) or InternVL (Adam) script",
    reference_url="https://arxiv.org/abs/2505.19892",
    inputs=("lora", "dense"),
    min_inputs=2,
    lowrank_on_lora=lambda p: not p.runs_dense("lora"),
)
def wudi2(inputs: ModuleInputs, params: Wudi2Params, *, generator: torch.Generator) -> MergeResult:
    """WUDI v2 (Wei et al. 2025, "Unifying MLLM capabilities and modalities via
    model merging", the second seed paper).

    Formula: ``tau_i = U S V^T``, ``k = min(m, n) // N`` (capped at the rank),
    ``x_i = S_k V_k^T``; target ``T_i = U_k S_k V_k^T`` (LoRA) or, centred
    (checkpoints), ``T_i = lowrank_k(tau_i - mean) + mean``;
    ``min_{tau_m} sum_i w_i ||(tau_m - T_i) x_i^T||_F^2 / ||tau_i||_F^2`` by
    ``iterations`` (300) steps; LoRA: SGD, momentum 0.9, lr 1e-4, init mean;
    checkpoints: Adam, lr 1e-5, init sum. Merged ``= scaling * tau_m``.
    ``solver=closed_form``: ``tau_m sum_i a_i G_i = sum_i a_i T_i G_i`` with
    ``G_i = x_i^T x_i``, solved by pseudo-inverse for the solution nearest the init.

    Reference: https://arxiv.org/abs/2505.19892 (released code: MLLMerging)

    Reference: ``wudi_merging2`` of MLLMerging (``recipe``, see Wudi2Params).
    Variant: for ``recipe=internvl`` the text takes ``x_i`` from the centred
    SVD while the released InternVL code takes it from the uncentred ``tau_i``
    - we follow the code. On LoRA inputs SGD runs in factor space (``space=
    auto``) and equals the dense result; with Adam (``recipe=internvl``) pass
    ``space=dense`` for the released trajectory.
    """
    return _merge(inputs, params, "wudi2")
