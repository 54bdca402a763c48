"""lmms-eval ``--apply_chat_template`` with model ``merged`` (issue 10: it raised
AttributeError, lmms-eval reads ``lm.chat_template``): the task renders the
context with our ``apply_chat_template`` and the model sends it as is."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")


def test_apply_chat_template_context_is_sent_as_is(text_lm):
    from lmms_eval.api.instance import Instance

    from harness_merge.harness.lmms_model import MergedLMM

    base, _ = text_lm
    m = MergedLMM.create_from_arg_string(f"pretrained={base},method=none,dtype=float32", {"batch_size": 1})
    assert m.chat_template and "<|im_start|>" in m.chat_template
    ctx = m.apply_chat_template([{"role": "user", "content": "Q: is the sky blue\nA:"}])
    assert ctx == m.backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q: is the sky blue\nA:"}], tokenize=False, add_generation_prompt=True
    )
    gk = {"until": ["\n"], "max_new_tokens": 5, "temperature": 0}
    inst = Instance(
        request_type="generate_until",
        arguments=(ctx, dict(gk), None, 0, "t", "test"),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    m.task_dict = {"t": {"test": [{}]}}
    out = m.generate_until([inst])
    assert m.merge_record["first_prompt"] == ctx  # not templated a second time
    from harness_merge.backends.base import GenRequest

    assert out == m.backend.generate([GenRequest(prompt=ctx, until=("\n",), max_new_tokens=5)])
