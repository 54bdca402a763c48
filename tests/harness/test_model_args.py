"""Unit tests of the shared model_args parser (the backend seam helpers are
tested in tests/backends/test_base.py)."""

from __future__ import annotations

import pytest

from harness_merge.errors import MethodParamError
from harness_merge.harness.model_args import (
    ModelArgsError,
    parse_list,
    parse_model_args,
    split_arg_string,
)


def test_split_keeps_brackets_quotes_and_braces():
    d = split_arg_string('pretrained=/m,adapters=[a,b,c],system_prompt="x, y",weights=[0.5,0.5]')
    assert d == {"pretrained": "/m", "adapters": "[a,b,c]", "system_prompt": "x, y", "weights": "[0.5,0.5]"}


def test_split_rejects_bare_comma_list():
    with pytest.raises(ModelArgsError, match=r"adapters=\[a,b,c\] or adapters=a;b;c"):
        split_arg_string("pretrained=/m,adapters=a,b")


@pytest.mark.parametrize(
    "v,out",
    [
        ("[a,b,c]", ("a", "b", "c")),
        ("a;b;c", ("a", "b", "c")),
        ("a", ("a",)),
        (["a", "b"], ("a", "b")),
        ("[ a , 'b' ]", ("a", "b")),
        ("[a;b]", ("a", "b")),
    ],
)
def test_parse_list(v, out):
    assert parse_list(v) == out


def test_full_parse_copa():
    h = parse_model_args(
        "pretrained=/b,adapters=[/a1,/a2],method=copa,prune_rate=0.8,combine=sum_of_products,"
        "scaling=2,backend=hf,dtype=float32,batch_size=4,max_new_tokens=16,cache_dir=/c,"
        "format=lora,rank=8,fold=true"
    )
    assert h.pretrained == "/b" and h.adapters == ("/a1", "/a2") and h.method == "copa"
    assert h.params == {"prune_rate": "0.8", "combine": "sum_of_products", "scaling": "2"}
    assert h.format == "lora" and h.rank == 8 and h.cache_dir == "/c" and h.backend == "hf"
    assert h.backend_opts == {"dtype": "float32", "batch_size": 4, "max_new_tokens": 16, "fold": True}
    spec = h.merge_spec()
    assert spec.base == "/b" and spec.method == "copa" and spec.params["prune_rate"] == "0.8"


def test_kwargs_from_harness_typed_values_and_defaults():
    # lmms-eval / lm-eval may hand typed values and CLI defaults (batch_size/device)
    h = parse_model_args(
        {
            "pretrained": "/b",
            "adapters": "/a1;/a2",
            "method": "dare",
            "drop_rate": 0.3,
            "seed": 7,
            "weights": "[1,2]",
        },
        defaults={"batch_size": "3", "device": None},
    )
    assert h.params == {"drop_rate": 0.3, "seed": 7, "weights": "1,2"}
    assert h.backend_opts == {"batch_size": 3}
    h2 = parse_model_args("pretrained=/b,adapters=[/a],method=ta,batch_size=5", defaults={"batch_size": 1})
    assert h2.backend_opts["batch_size"] == 5  # model_args wins over the CLI default


def test_params_validated_by_method_dataclass():
    from harness_merge import methods

    h = parse_model_args("pretrained=/b,adapters=[/a,/b2],method=ties,prune_rate=0.7,weights=[0.5,0.25]")
    p = methods.get("ties").make_params(h.params)
    assert p.prune_rate == 0.7 and p.weights == (0.5, 0.25)


def test_unknown_key_lists_valid_ones_and_suggests():
    with pytest.raises(ModelArgsError) as ei:
        parse_model_args("pretrained=/b,adapters=[/a],method=copa,prune_rat=0.5")
    msg = str(ei.value)
    assert "prune_rat" in msg and "did you mean 'prune_rate'" in msg
    assert "method copa parameters: scaling, weights, nonlinear, prune_rate" in msg and "batch_size" in msg


def test_unknown_method_lists_available():
    with pytest.raises(MethodParamError, match=r"unknown method 'copaa'.*Did you mean: copa"):
        parse_model_args("pretrained=/b,adapters=[/a],method=copaa")


@pytest.mark.parametrize(
    "s,match",
    [
        ("adapters=[/a],method=ta", "pretrained"),
        ("pretrained=/b,method=ta", "adapters is required"),
        ("pretrained=/b,adapters=[/a]", "method is required.*copa"),
        ("pretrained=/b,adapters=[/a],method=ta,backend=tgi", "backend must be hf or vllm"),
        ("pretrained=/b,adapters=[/a],method=ta,format=gguf", "format must be"),
        ("pretrained=/b,adapters=[/a],method=ta,rank=0", "rank must be >= 1"),
        ("pretrained=/b,adapters=[/a],method=ta,batch_size=x", "batch_size must be an integer"),
        ("pretrained=/b,adapters=[/a],method=ta,fold=maybe", "fold must be true or false"),
        ("pretrained=/b,adapters=[/a],method=ta,tensor_parallel_size=2", "backend=vllm only"),
        ("pretrained=/b,adapters=[/a],method=ta,backend=vllm,fold=true", "fold applies to backend=hf"),
    ],
)
def test_bad_values(s, match):
    with pytest.raises(ModelArgsError, match=match):
        parse_model_args(s)


def test_vllm_pass_throughs():
    h = parse_model_args(
        "pretrained=/b,adapters=[/a],method=ta,backend=vllm,tensor_parallel_size=2,"
        "gpu_memory_utilization=0.5,max_model_len=4096,enforce_eager=true,max_lora_rank=64"
    )
    assert h.backend_opts == {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5,
        "max_model_len": 4096,
        "enforce_eager": True,
        "max_lora_rank": 64,
    }


def test_batch_size_auto_is_refused_with_a_message():
    # issue 10: "auto" used to become 1 silently; now it is refused and names the key
    with pytest.raises(ModelArgsError, match=r"batch_size=auto:4 .*not supported.*give a number"):
        parse_model_args("pretrained=/b,adapters=[/a],method=ta,batch_size=auto:4")
    with pytest.raises(ModelArgsError, match=r"batch_size=auto"):
        parse_model_args({"pretrained": "/b", "method": "none"}, defaults={"batch_size": "auto"})


def test_import_harness_merge_is_light():
    import subprocess
    import sys

    code = (
        "import sys, harness_merge, harness_merge.backends, harness_merge.harness, "
        "harness_merge.harness.model_args; "
        "bad = [m for m in ('vllm', 'lmms_eval', 'lm_eval', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_method_none_serves_base_alone():
    from harness_merge.harness.model_args import parse_model_args

    h = parse_model_args("pretrained=/b,method=none,batch_size=2")
    assert h.method == "none" and h.adapters == () and h.merge_spec() is None
    with pytest.raises(ModelArgsError, match="method=none serves the base model alone; drop adapters"):
        parse_model_args("pretrained=/b,method=none,adapters=[/a]")
    with pytest.raises(ModelArgsError, match="unknown key"):
        parse_model_args("pretrained=/b,method=none,scaling=2")


# -- namespaced arguments (issue 10) ------------------------------------------------
def test_wudi_device_flat_is_the_serving_device_not_the_method_parameter():
    h = parse_model_args("pretrained=/b,adapters=[/a,/c],method=wudi,device=cuda:0")
    assert h.backend_opts["device"] == "cuda:0"
    assert "device" not in h.params
    h = parse_model_args(
        "pretrained=/b,adapters=[/a,/c],method=wudi,params={device=cpu,iterations=5},device=cuda:1"
    )
    assert h.params == {"device": "cpu", "iterations": "5"} and h.backend_opts["device"] == "cuda:1"


def test_wudi2_rank_flat_is_the_artifact_rank_and_params_rank_is_the_method_rank():
    h = parse_model_args("pretrained=/b,adapters=[/a,/c],method=wudi2,rank=16")
    assert h.rank == 16 and "rank" not in h.params
    h = parse_model_args("pretrained=/b,adapters=[/a,/c],method=wudi2,rank=16,params={rank:4}")
    assert h.rank == 16 and h.params == {"rank": "4"}
    spec = h.merge_spec()
    assert spec.rank == 16 and spec.params["rank"] == "4"


def test_method_params_never_shadow_reserved_keys_by_construction():
    from harness_merge import methods
    from harness_merge.harness.model_args import RESERVED_KEYS

    for name in methods.available():
        fields = methods.get(name).params_cls.field_names()
        args = ",".join(f"{k}=1" for k in fields if k not in RESERVED_KEYS and k != "weights")
        h = parse_model_args(f"pretrained=/b,adapters=[/a,/c],method={name}" + (f",{args}" if args else ""))
        assert set(h.params) <= set(fields) - RESERVED_KEYS


def test_params_errors_name_the_key():
    with pytest.raises(ModelArgsError, match=r"params: 'prune_rat' is not a parameter of method ties"):
        parse_model_args("pretrained=/b,adapters=[/a,/c],method=ties,params={prune_rat=0.5}")
    with pytest.raises(ModelArgsError, match=r"prune_rate is given twice"):
        parse_model_args("pretrained=/b,adapters=[/a,/c],method=ties,prune_rate=0.1,params={prune_rate=0.5}")
    with pytest.raises(ModelArgsError, match=r"params must be written params=\{"):
        parse_model_args("pretrained=/b,adapters=[/a,/c],method=ties,params=prune_rate")
    with pytest.raises(ModelArgsError, match=r"inside params=\{\.\.\.\} only: .*device"):
        parse_model_args("pretrained=/b,adapters=[/a,/c],method=wudi,devic=cpu")


def test_serving_keys_users_type_are_accepted():
    h = parse_model_args(
        "pretrained=Qwen/Qwen2-VL-7B-Instruct,method=none,max_pixels=602112,min_pixels=3136,"
        "device_map=auto,attn_implementation=sdpa,revision=abc123,subfolder=sub,"
        "chat_template=/t.jinja,prompt_profile=qwen2_vl"
    )
    assert h.backend_opts == {
        "max_pixels": 602112,
        "min_pixels": 3136,
        "device_map": "auto",
        "attn_implementation": "sdpa",
        "revision": "abc123",
        "subfolder": "sub",
        "chat_template": "/t.jinja",
    }
    assert h.prompt_profile == "qwen2_vl"
    with pytest.raises(ModelArgsError, match=r"prompt_profile must be one of .*qwen2_vl"):
        parse_model_args("pretrained=/b,method=none,prompt_profile=qwen")
    with pytest.raises(ModelArgsError, match=r"device_map applies to backend=hf only"):
        parse_model_args("pretrained=/b,method=none,backend=vllm,device_map=auto")
    with pytest.raises(ModelArgsError, match=r"min_pixels=9 is above max_pixels=4"):
        parse_model_args("pretrained=/b,method=none,min_pixels=9,max_pixels=4")
    h = parse_model_args("pretrained=/b,method=none,backend=vllm,data_parallel_size=2,tensor_parallel_size=2")
    assert h.backend_opts == {"data_parallel_size": 2, "tensor_parallel_size": 2}


def test_run_id_is_readable_and_separates_merges():
    from harness_merge.harness import run_id

    man = {
        "method": "copa",
        "params": {"prune_rate": 0.8},
        "adapters": [{"sha256": "a" * 64}, {"sha256": "b" * 64}],
    }
    h = parse_model_args("pretrained=Qwen/Qwen2-VL-7B-Instruct,adapters=[/a,/b],method=copa")
    rid = run_id(h, man)
    assert rid.startswith("Qwen2-VL-7B-Instruct__copa-") and len(rid.split("-")[-1]) == 8
    other = {**man, "params": {"prune_rate": 0.5}}
    assert run_id(h, other) != rid
    assert run_id(h, {**man, "adapters": man["adapters"][::-1]}) != rid
    h16 = parse_model_args("pretrained=Qwen/Qwen2-VL-7B-Instruct,adapters=[/a,/b],method=copa,rank=16")
    assert run_id(h16, man) != rid
    assert run_id(h, dict(man)) == rid  # deterministic
    none = parse_model_args("pretrained=/m/base/,method=none")
    assert run_id(none, None) == "base__none"
