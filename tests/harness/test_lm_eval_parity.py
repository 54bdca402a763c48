"""Parity with lm-eval's own ``hf`` model (lm-eval 0.4.13): ``merged method=none``
must give, request for request, the numbers ``HFLM`` gives on the same base.

In-process (fast): both models answer the same ``Instance`` lists. The CLI twin
(``lm-eval-merged --model hf`` beside ``--model merged``) is in
``test_lm_eval_e2e.py``.
"""

from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from harness_merge.backends.base import encode_pair  # noqa: E402

# contexts as lm-eval builds them: with a trailing space/newline (moved into the
# continuation by _encode_pair), without, empty (prefix token), and chat-templated
QA = [
    ("Q: is the sky blue\nA:", " yes"),
    ("Q: is fire cold\nA: ", "no"),
    ("Question: 2+2=\n", "4\n"),
    ("", "hello world"),
    ("The cat", " sat on the mat."),
]


@pytest.fixture(scope="module")
def pair(text_lm):
    from lm_eval.models.huggingface import HFLM

    from harness_merge.harness.lm_eval_model import MergedLM

    base, _ = text_lm
    ref = HFLM(pretrained=str(base), device="cpu", batch_size=1, dtype="float32")
    ours = MergedLM.create_from_arg_string(
        f"pretrained={base},method=none,dtype=float32,device=cpu", {"batch_size": 1}
    )
    return ref, ours


def _inst(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _chat(lm, ctx):
    return lm.apply_chat_template([{"role": "user", "content": ctx}], add_generation_prompt=True)


def test_encode_pair_matches_lm_eval(pair):
    ref, ours = pair
    tok = ours.backend.tokenizer
    for ctx, cont in QA[:3] + QA[4:]:
        assert encode_pair(tok, ctx, cont) == ref._encode_pair(ctx, cont), (ctx, cont)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "apply_chat_template"])
def test_loglikelihood_equals_hflm_per_request(pair, chat):
    ref, ours = pair
    reqs = []
    for _i, (ctx, cont) in enumerate(QA):
        if chat and ctx:
            ctx_r, ctx_o = _chat(ref, ctx), _chat(ours, ctx)
            assert ctx_r == ctx_o  # the same rendered context reaches both models
            ctx = ctx_r
        reqs.append((ctx, cont))
    r = ref.loglikelihood([_inst("loglikelihood", a, i) for i, a in enumerate(reqs)], disable_tqdm=True)
    o = ours.loglikelihood([_inst("loglikelihood", a, i) for i, a in enumerate(reqs)])
    assert len(r) == len(o) == len(QA)
    for (lr, gr), (lo, go), a in zip(r, o, reqs):
        assert lo == pytest.approx(lr, abs=1e-4), a
        assert go == gr, a


def test_rolling_and_generate_equal_hflm(pair):
    ref, ours = pair
    texts = [("is the sky blue yes",), ("can fish fly no " * 3,)]
    r = ref.loglikelihood_rolling(
        [_inst("loglikelihood_rolling", t, i) for i, t in enumerate(texts)], disable_tqdm=True
    )
    o = ours.loglikelihood_rolling([_inst("loglikelihood_rolling", t, i) for i, t in enumerate(texts)])
    assert o == pytest.approx(r, abs=1e-4)
    # HFLM passes max_length=context+max_gen_toks, which transformers ignores when the
    # model's generation_config sets max_new_tokens (the tiny base sets 16): ask for 16
    gk = {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
    gens = [(f"Q: {q}\nA:", dict(gk)) for q in ("is the sky blue", "is ice hot", "can fish fly")]
    r = ref.generate_until([_inst("generate_until", g, i) for i, g in enumerate(gens)], disable_tqdm=True)
    o = ours.generate_until([_inst("generate_until", g, i) for i, g in enumerate(gens)])
    assert o == r
