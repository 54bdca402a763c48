"""LLaVA's vicuna_v1 conversation template, written out by hand from
llava/conversation.py (conv_vicuna_v1, SeparatorStyle.TWO)."""

import pytest

from harness_merge.backends.base import render_prompt
from harness_merge.harness import conv_templates
from harness_merge.harness.model_args import ModelArgsError, parse_model_args

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def test_vicuna_v1_prompt_is_llavas():
    t = conv_templates.get_template("vicuna_v1")
    # LLaVA: system + sep, then "USER: " + "<image>\n" + q + sep, then "ASSISTANT:"
    assert t.prompt("What colour is it?", 1) == SYSTEM + " USER: <image>\nWhat colour is it? ASSISTANT:"
    assert (
        t.prompt("<image>\nWhat colour?", 1, "<|image_pad|>")
        == SYSTEM + " USER: <|image_pad|>\nWhat colour? ASSISTANT:"
    )
    assert t.prompt("Hi", 0) == SYSTEM + " USER: Hi ASSISTANT:"


def test_requests_are_raw_prompts_that_backends_send_as_is():
    t = conv_templates.VICUNA_V1
    g = conv_templates.gen_request(t, "Q?", {"until": ("\n",), "max_new_tokens": 4}, ["img"], "<image>")
    assert g.prompt.endswith("USER: <image>\nQ? ASSISTANT:") and g.images == ("img",) and g.until == ("\n",)
    assert render_prompt(g, processor=None, tokenizer=None, system_prompt="ignored") == g.prompt
    ll = conv_templates.ll_request(t, "Q?", "yes", ["img"])
    assert ll.context == g.prompt and ll.continuation == " yes"


def test_model_args_conv_template():
    h = parse_model_args("pretrained=/b,adapters=[/a],method=ta,conv_template=vicuna_v1")
    assert h.conv_template == "vicuna_v1"
    assert parse_model_args("pretrained=/b,adapters=[/a],method=ta").conv_template is None
    with pytest.raises(ModelArgsError, match="conv_template must be one of vicuna_v1"):
        parse_model_args("pretrained=/b,adapters=[/a],method=ta,conv_template=llama_2")
