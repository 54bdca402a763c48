"""Tiny offline models (0.08M-0.17M parameters) for tests and the demo.

Everything is built from configs: no model hub. The tokenizer is byte-level
(256 symbols, no merges) plus the Qwen2-VL special tokens, so it encodes any
text. Models are saved with their tokenizer and an image processor that does
not need torchvision (``Qwen2VLImageProcessorPil`` / ``CLIPImageProcessorPil``).

Modality models sharing one text LLM (:func:`build_tiny_modality_models`):
LLaVA (vision), Qwen2-Audio (audio, with a Whisper feature extractor) and
Video-LLaVA (video, frames through a PIL CLIP image processor);
:func:`write_tiny_clip` writes a tiny MP4 (optionally with a sine-tone track).

Loading a saved tiny Qwen2-VL folder::

    processor = AutoProcessor.from_pretrained(path)   # Qwen2VLProcessor
    model = Qwen2VLForConditionalGeneration.from_pretrained(path)
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# ChatML. A message's content is a string or a list of items; image items
# render as the Qwen2-VL vision placeholder, video items likewise.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Small image budget: a 56x56 image becomes a 4x4 patch grid, 4 LLM tokens.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112


def _byte_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet(), key=lambda s: ord(s))
    return {s: i for i, s in enumerate(symbols)}


def build_tokenizer():
    """A byte-level ``Qwen2Tokenizer`` with no merges, the Qwen2-VL special tokens
    and a ChatML chat template. Ids: 0-255 the bytes, 256-262 the specials in
    ``SPECIAL_TOKENS`` order (263 ids)."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab = _byte_vocab()
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    tok.padding_side = "left"
    return tok


def _ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _vocab_size(tok) -> int:
    # round up to a multiple of 8 (harmless padding rows, friendlier to kernels)
    n = len(tok)
    return (n + 7) // 8 * 8


def tiny_qwen2vl_config(tok=None):
    from transformers import Qwen2VLConfig

    tok = tok or build_tokenizer()
    ids = _ids(tok)
    text = {
        "vocab_size": _vocab_size(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": True,
    }
    vision = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": 64,  # output dim of the patch merger = LLM hidden size
        "num_heads": 2,
        "mlp_ratio": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _image_only_processor_class():
    """A ``Qwen2VLProcessor`` without its video processor.

    transformers 5.x's ``Qwen2VLProcessor`` requires a video processor, whose
    classes need torchvision; our CPU torch cannot import torchvision. Images
    go through exactly the same code (``Qwen2VLProcessor.__call__``)."""
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor


def build_qwen2vl_processor(tok=None):
    """A Qwen2-VL processor with the PIL image processor (no torchvision).

    Returns a real ``Qwen2VLProcessor`` when a video processor can be built
    (torchvision importable), else the image-only subclass."""
    from transformers import Qwen2VLImageProcessorPil

    tok = tok or build_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    try:
        from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        return Qwen2VLProcessor(
            image_processor=image_processor, tokenizer=tok, video_processor=video, chat_template=CHAT_TEMPLATE
        )
    except Exception:  # noqa: BLE001 - torchvision missing: video processors cannot be built
        cls = _image_only_processor_class()
        return cls(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def load_processor(path):
    """Load the processor of a model folder, also without torchvision.

    ``AutoProcessor.from_pretrained`` first; if that fails because the video
    processor needs torchvision, a Qwen2-VL folder gets the image-only
    ``Qwen2VLProcessor`` (PIL image processor + tokenizer + chat template)."""
    from transformers import AutoConfig, AutoProcessor

    cfg = AutoConfig.from_pretrained(path)
    is_qwen_vl = getattr(cfg, "model_type", None) in ("qwen2_vl", "qwen2_5_vl")
    try:
        proc = AutoProcessor.from_pretrained(path)
        if not is_qwen_vl or hasattr(proc, "image_processor"):
            return proc
    except Exception:
        if not is_qwen_vl:
            raise
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    pp = (
        json.loads(Path(path, "processor_config.json").read_text())
        if Path(path, "processor_config.json").exists()
        else {}
    )
    ip_cfg = dict(pp.get("image_processor") or {})
    if not ip_cfg and Path(path, "preprocessor_config.json").exists():
        ip_cfg = json.loads(Path(path, "preprocessor_config.json").read_text())
    for k in ("image_processor_type", "processor_class", "backend"):
        ip_cfg.pop(k, None)
    tok = AutoTokenizer.from_pretrained(path)
    template = tok.chat_template
    ct = Path(path, "chat_template.jinja")
    if ct.exists():
        template = ct.read_text()
    cls = _image_only_processor_class()
    return cls(image_processor=Qwen2VLImageProcessorPil(**ip_cfg), tokenizer=tok, chat_template=template)


def _generation_config(tok):
    from transformers import GenerationConfig

    ids = _ids(tok)
    return GenerationConfig(
        do_sample=False,
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        max_new_tokens=16,
    )


def new_tiny_qwen2vl(seed: int = 0):
    """(model, processor) in memory, random weights seeded by ``seed``."""
    from transformers import Qwen2VLForConditionalGeneration

    tok = build_tokenizer()
    _seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2vl_config(tok))
    model.generation_config = _generation_config(tok)
    model.eval()
    return model, build_qwen2vl_processor(tok)


def build_tiny_qwen2vl(out_dir, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (hidden 64, 2 heads of 32, 2 layers,
    mrope [4, 6, 6], 1-block vision tower) with tokenizer and processor.

    Load its processor with :func:`load_processor` (``AutoProcessor`` works
    where torchvision imports)."""
    model, processor = new_tiny_qwen2vl(seed)
    return save_model(model, processor, out_dir)


def save_model(model, processor_or_tokenizer, out_dir) -> Path:
    """Save model + processor/tokenizer; an image-only Qwen2-VL processor is
    recorded as a plain ``Qwen2VLProcessor`` (with a video processor entry) so
    ``AutoProcessor`` and vLLM load the folder wherever torchvision imports."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor_or_tokenizer.save_pretrained(out)
    pc = out / "processor_config.json"
    if pc.exists():
        d = json.loads(pc.read_text())
        if d.get("processor_class") == "Qwen2VLImageOnlyProcessor":
            d["processor_class"] = "Qwen2VLProcessor"
            ip = d["image_processor"]
            d["video_processor"] = {
                "video_processor_type": "Qwen2VLVideoProcessor",
                "size": dict(ip["size"]),
                "patch_size": ip["patch_size"],
                "temporal_patch_size": ip["temporal_patch_size"],
                "merge_size": ip["merge_size"],
                "image_mean": ip["image_mean"],
                "image_std": ip["image_std"],
            }
            pc.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return out


def tiny_llava_config(tok=None):
    from transformers import CLIPVisionConfig, LlavaConfig

    tok = tok or build_tokenizer()
    ids = _ids(tok)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    text = tiny_text_config(tok)  # the one tiny LLM every family here shares
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=4,
        tie_word_embeddings=True,
    )


def build_llava_processor(tok=None):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tok = tok or build_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<|image_pad|>",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>"),
    )


def build_tiny_llava(out_dir, seed: int = 0) -> Path:
    """Write a tiny random LLaVA (CLIP vision 28px / patch 14 -> 4 image tokens,
    Qwen2 text hidden 64) with tokenizer and ``LlavaProcessor``."""
    from transformers import LlavaForConditionalGeneration

    tok = build_tokenizer()
    _seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(tok))
    model.generation_config = _generation_config(tok)
    return save_model(model, build_llava_processor(tok), out_dir)


def tiny_text_config(tok=None):
    from transformers import Qwen2Config

    tok = tok or build_tokenizer()
    ids = _ids(tok)
    return Qwen2Config(
        vocab_size=_vocab_size(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )


def build_tiny_text_lm(out_dir, seed: int = 0) -> Path:
    """Write a tiny random text-only ``Qwen2ForCausalLM`` with its tokenizer (for lm-eval)."""
    from transformers import Qwen2ForCausalLM

    tok = build_tokenizer()
    _seed(seed)
    model = Qwen2ForCausalLM(tiny_text_config(tok))
    model.generation_config = _generation_config(tok)
    return save_model(model, tok, out_dir)


def _load_for_lora(base_dir):
    """Load a saved tiny model with the class its config names."""
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    cls = getattr(transformers, cfg.architectures[0])
    return cls.from_pretrained(base_dir)


def random_lora(
    base_dir,
    out_dir,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets=("q_proj", "v_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    std: float = 0.5,
) -> Path:
    """Write a PEFT LoRA adapter for ``base_dir`` with random, nonzero A and B.

    ``targets`` are PEFT ``target_modules`` names (suffixes); for vision-language
    models they are restricted to the language model (vision blocks of Qwen2-VL
    use a fused ``qkv``, so ``q_proj``/``v_proj`` only match text layers anyway).
    """
    from peft import LoraConfig

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        init_lora_weights=True,
    )
    return _write_random_adapter(base_dir, out_dir, cfg, seed=seed, std=std)


def _write_random_adapter(
    base_dir, out_dir, cfg, *, seed: int, std: float, magnitude_std: float = 0.0
) -> Path:
    """PEFT's adapter ``cfg`` on ``base_dir`` with seeded random A and B (and, for
    DoRA, magnitude vectors scaled by ``1 + magnitude_std * noise``), saved by PEFT."""
    import torch
    from peft import get_peft_model

    pm = get_peft_model(_load_for_lora(base_dir), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std / max(p.shape[-1], 1) ** 0.5)
        if magnitude_std:
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + magnitude_std * torch.randn(p.shape, generator=g))
    out = Path(out_dir)
    pm.save_pretrained(out)
    return out


def random_dora(
    base_dir,
    out_dir,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets=("q_proj", "v_proj"),
    seed: int = 0,
    std: float = 0.5,
    magnitude_std: float = 0.3,
) -> Path:
    """Write a PEFT DoRA adapter (``use_dora=True``) for ``base_dir``: random,
    nonzero A and B as :func:`random_lora`, and magnitude vectors moved away from
    PEFT's initial row norms by ``(1 + magnitude_std * noise)``, so that a merge
    that dropped or recomputed the magnitudes changes the outputs."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        use_dora=True,
        init_lora_weights=True,
    )
    return _write_random_adapter(base_dir, out_dir, cfg, seed=seed, std=std, magnitude_std=magnitude_std)


def save_llava_repo_lora(
    base_dir,
    out_dir,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets=("q_proj", "v_proj"),
    seed: int = 0,
    std: float = 0.5,
    projector_std: float = 0.2,
) -> Path:
    """Write a LoRA checkpoint for the tiny llava-hf model at ``base_dir`` in the
    original LLaVA repository's layout (``train_mem.py --lora_enable``):
    ``adapter_config.json`` + ``adapter_model.bin`` keyed
    ``base_model.model.model.layers.{i}...lora_{A,B}.weight`` and
    ``non_lora_trainables.bin`` with a trained projector
    ``base_model.model.model.mm_projector.{0,2}.{weight,bias}`` (the base's
    projector plus seeded noise), and LLaVA's own ``config.json``."""
    import json

    import torch
    from peft import LoraConfig

    model = _load_for_lora(base_dir)
    g = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm_prefix = "model.language_model."
    sd = {}
    for name, mod in model.named_modules():
        if not name.startswith(lm_prefix) or not isinstance(mod, torch.nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        orig = "model." + name[len(lm_prefix) :]
        d_out, d_in = mod.weight.shape
        sd[f"base_model.model.{orig}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * std / d_in**0.5
        sd[f"base_model.model.{orig}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * std / rank**0.5
    torch.save(sd, out / "adapter_model.bin")
    LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path="lmsys/vicuna-7b-v1.5",
    ).save_pretrained(str(out))
    proj = model.model.multi_modal_projector
    non_lora = {}
    for idx, lin in (("0", proj.linear_1), ("2", proj.linear_2)):
        for p in ("weight", "bias"):
            t = getattr(lin, p).detach()
            non_lora[f"base_model.model.model.mm_projector.{idx}.{p}"] = t + projector_std * torch.randn(
                t.shape, generator=g
            )
    torch.save(non_lora, out / "non_lora_trainables.bin")
    cfg = model.config
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava_llama",
                "hidden_size": cfg.text_config.hidden_size,
                "mm_hidden_size": cfg.vision_config.hidden_size,
                "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2,
                "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False,
                "image_aspect_ratio": "pad",
                "tune_mm_mlp_adapter": False,
            },
            indent=2,
        )
    )
    return out


# ---------------------------------------------------------------------------
# InternVL2.5 (transformers' native InternVL classes, no remote code)
# ---------------------------------------------------------------------------
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")


def build_internvl_tokenizer():
    """The byte-level tokenizer plus InternVL's image tokens (``<img>``,
    ``</img>``, ``<IMG_CONTEXT>``, ``<video>``), named as ``InternVLProcessor``
    expects, and a ChatML template whose image item is ``<IMG_CONTEXT>`` (the
    processor expands it to ``<img><IMG_CONTEXT>*n</img>``)."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab = _byte_vocab()
    for t in SPECIAL_TOKENS + INTERNVL_TOKENS:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + INTERNVL_TOKENS
            ]
        }
    )
    tok.chat_template = INTERNVL_CHAT_TEMPLATE
    tok.model_max_length = 4096
    tok.padding_side = "left"
    return tok


INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>"
).replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>")


def tiny_internvl_config(tok=None):
    from transformers import InternVLConfig, InternVLVisionConfig

    tok = tok or build_internvl_tokenizer()
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[28, 28],
        patch_size=[14, 14],
    )
    text = tiny_text_config(tok)  # the one tiny LLM every family here shares
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=1,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )


def build_internvl_processor(tok=None):
    """``InternVLProcessor`` with the PIL ``GotOcr2`` image processor (28 px
    tiles, at most 2 tiles + thumbnail) and no video processor (its class needs
    torchvision)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    tok = tok or build_internvl_tokenizer()

    class InternVLImageOnlyProcessor(InternVLProcessor):
        def __init__(
            self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kw
        ):
            InternVLProcessor.__init__(
                self, image_processor, tokenizer, None, image_seq_length, chat_template, **kw
            )

    ip = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=False, max_patches=2)
    return InternVLImageOnlyProcessor(
        image_processor=ip, tokenizer=tok, image_seq_length=1, chat_template=INTERNVL_CHAT_TEMPLATE
    )


def build_tiny_internvl(out_dir, seed: int = 0) -> Path:
    """Write a tiny random InternVL2.5-style model (``InternVLForConditionalGeneration``:
    InternViT-style vision 28 px / patch 14, pixel-shuffle MLP projector, Qwen2
    text hidden 64) with tokenizer and processor; ~0.15M parameters."""
    from transformers import InternVLForConditionalGeneration

    tok = build_internvl_tokenizer()
    _seed(seed)
    model = InternVLForConditionalGeneration(tiny_internvl_config(tok))
    model.generation_config = _generation_config(tok)
    out = save_model(model, build_internvl_processor(tok), out_dir)
    pc = out / "processor_config.json"
    d = json.loads(pc.read_text())
    d["processor_class"] = "InternVLProcessor"  # the image-only subclass is ours; record the real class
    pc.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return out


def perturbed_checkpoint(base_dir, out_dir, *, seed: int = 0, rel_std: float = 0.1) -> Path:
    """A stand-in for a full fine-tuned checkpoint of ``base_dir``: every floating
    tensor (vision, projector and language model) moved by seeded noise of
    ``rel_std`` times its own standard deviation; side files copied."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(base.glob("*.safetensors")):
        sd = load_file(str(f))
        for k, t in sd.items():
            if t.is_floating_point() and t.numel() > 1:
                scale = float(t.float().std()) or 1.0
                sd[k] = (t.float() + rel_std * scale * torch.randn(t.shape, generator=g)).to(t.dtype)
        save_file(sd, str(out / f.name), metadata={"format": "pt"})
    for p in base.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors"):
            shutil.copy2(p, out / p.name)
    return out


# ---------------------------------------------------------------------------
# modality models sharing one LLM (vision: LLaVA, audio: Qwen2-Audio)
# ---------------------------------------------------------------------------
def _share_llm(model_dir, base_llm_dir, seed: int, rel_std: float) -> None:
    """Overwrite ``model_dir``'s language-model tensors with the base LLM's plus
    seeded noise (a model fine-tuned from that LLM); encoders untouched."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..inputs.checkpoint import Checkpoint
    from ..modality import shared_key_map

    base = Checkpoint("base", Path(base_llm_dir))
    ck = Checkpoint("model", Path(model_dir))
    mp = shared_key_map(base, ck)
    g = torch.Generator().manual_seed(seed)
    for fn in ck.file_names:
        sd = load_file(str(Path(model_dir) / fn))
        for b, k in mp.items():
            if k in sd:
                t = base.get(b).float()
                sd[k] = (t + rel_std * (float(t.std()) or 1.0) * torch.randn(t.shape, generator=g)).to(
                    sd[k].dtype
                )
        save_file(sd, str(Path(model_dir) / fn), metadata={"format": "pt"})


def build_tiny_audio_lm(out_dir, seed: int = 0) -> Path:
    """A tiny random ``Qwen2AudioForConditionalGeneration`` (Whisper-style audio
    encoder d_model 32, 16 mel bins; the same Qwen2 text model as
    :func:`build_tiny_text_lm`), saved with its ``Qwen2AudioProcessor``
    (:func:`build_audio_processor`)."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
    )

    tok = build_tokenizer()
    _seed(seed)
    ac = Qwen2AudioEncoderConfig(
        num_mel_bins=16,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        d_model=32,
        max_source_positions=50,
    )
    cfg = Qwen2AudioConfig(
        audio_config=ac,
        text_config=tiny_text_config(tok).to_dict(),
        audio_token_index=tok.convert_tokens_to_ids("<|video_pad|>"),
    )
    model = Qwen2AudioForConditionalGeneration(cfg)
    model.generation_config = _generation_config(tok)
    return save_model(model, build_audio_processor(tok), out_dir)


def build_tiny_modality_models(
    base_llm_dir,
    root,
    *,
    seed: int = 0,
    rel_std: float = 0.2,
    modalities: tuple[str, ...] = ("vision", "audio"),
) -> dict[str, Path]:
    """{"vision": tiny LLaVA, "audio": tiny Qwen2-Audio, "video": tiny
    Video-LLaVA} (those named in ``modalities``), each with its own encoder and
    connector and a language model fine-tuned (seeded noise) from the text LLM
    at ``base_llm_dir`` (:func:`build_tiny_text_lm`)."""
    builders = {"vision": build_tiny_llava, "audio": build_tiny_audio_lm, "video": build_tiny_video_lm}
    unknown = [m for m in modalities if m not in builders]
    if unknown:
        raise ValueError(f"build_tiny_modality_models: unknown modalities {unknown}; known: {list(builders)}")
    root = Path(root)
    offsets = {"vision": 1, "audio": 2, "video": 3}
    out = {m: builders[m](root / m, seed=seed + offsets[m]) for m in modalities}
    for m, d in out.items():
        _share_llm(d, base_llm_dir, seed=seed + 9 + offsets[m], rel_std=rel_std)
    return out


# ---------------------------------------------------------------------------
# modality processors and the video-language model (Video-LLaVA)
# ---------------------------------------------------------------------------
def _modality_chat_template(kind: str, placeholder: str) -> str:
    """CHAT_TEMPLATE with ``kind`` items ("audio" / "video") rendered as ``placeholder``."""
    return CHAT_TEMPLATE.replace(
        "{%- elif 'text' in item -%}",
        "{%- elif item['type'] == '" + kind + "' -%}{{- '" + placeholder + "' -}}{%- elif 'text' in item -%}",
    )


AUDIO_SAMPLING_RATE = 16000


def build_audio_processor(tok=None):
    """``Qwen2AudioProcessor``: a Whisper feature extractor (16 mel bins, 1 s
    chunks -> 100 frames, what :func:`build_tiny_audio_lm`'s encoder takes) and
    the tokenizer; the audio placeholder is ``<|vision_start|><|video_pad|><|vision_end|>``
    (bos, audio token, eos), expanded by the processor to the clip's length."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    tok = tok or build_tokenizer()
    fe = WhisperFeatureExtractor(
        feature_size=16, sampling_rate=AUDIO_SAMPLING_RATE, hop_length=160, chunk_length=1, n_fft=400
    )
    return Qwen2AudioProcessor(
        feature_extractor=fe,
        tokenizer=tok,
        chat_template=_modality_chat_template("audio", "<|vision_start|><|video_pad|><|vision_end|>"),
        audio_token="<|video_pad|>",
        audio_bos_token="<|vision_start|>",
        audio_eos_token="<|vision_end|>",
    )


def build_video_processor(tok=None):
    """``VideoLlavaProcessor`` with a PIL CLIP image processor (28 px); a video
    item renders as one ``<|video_pad|>`` (the hf backend expands it per frame).

    transformers 5.x video processors need torchvision, which our CPU torch
    cannot import: the processor is built without one (as the image-only
    Qwen2-VL processor) and saved as a plain ``VideoLlavaProcessor`` with a
    video processor entry; the hf backend then sends video frames through the
    image processor (Video-LLaVA's video and image preprocessing are the same
    CLIP transform)."""
    from transformers import CLIPImageProcessorPil, ProcessorMixin, VideoLlavaProcessor

    tok = tok or build_tokenizer()

    class VideoLlavaImageOnlyProcessor(VideoLlavaProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.patch_size = 14
            self.num_additional_image_tokens = 1
            self.vision_feature_select_strategy = "default"
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return VideoLlavaImageOnlyProcessor(
        image_processor=ip, tokenizer=tok, chat_template=_modality_chat_template("video", "<|video_pad|>")
    )


def build_tiny_video_lm(out_dir, seed: int = 0) -> Path:
    """A tiny random ``VideoLlavaForConditionalGeneration`` (CLIP video/image
    towers 28 px / patch 14 -> 5 tokens a frame; the same Qwen2 text model as
    :func:`build_tiny_text_lm`), saved with the tokenizer and its processor."""
    from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    tok = build_tokenizer()
    ids = _ids(tok)
    _seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    cfg = VideoLlavaConfig(
        vision_config=vision.to_dict(),
        text_config=tiny_text_config(tok).to_dict(),
        image_token_index=ids["<|image_pad|>"],
        video_token_index=ids["<|video_pad|>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=4,
        video_seq_length=5 * 2,
        tie_word_embeddings=True,
    )
    model = VideoLlavaForConditionalGeneration(cfg)
    model.generation_config = _generation_config(tok)
    out = save_model(model, build_video_processor(tok), out_dir)
    pc = out / "processor_config.json"
    d = json.loads(pc.read_text())
    d.update(
        processor_class="VideoLlavaProcessor",
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
    )
    ip = d["image_processor"]
    d["video_processor"] = {
        "video_processor_type": "VideoLlavaVideoProcessor",
        **{k: ip[k] for k in ("size", "crop_size", "image_mean", "image_std") if k in ip},
    }
    pc.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return out


def write_tiny_clip(
    path, colors=((200, 30, 30), (30, 30, 200)), *, size: int = 32, fps: int = 4, tone_hz: float | None = None
) -> Path:
    """Write a tiny MP4 (MPEG-4 video, ``size`` px, one frame per colour in
    ``colors``), with an AAC mono audio track of a ``tone_hz`` sine at 16 kHz
    as long as the video when ``tone_hz`` is given. Uses PyAV."""
    import av
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=fps)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        aus = None
        if tone_hz is not None:
            aus = c.add_stream("aac", rate=AUDIO_SAMPLING_RATE)
            aus.layout = "mono"
        for col in colors:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), col, dtype=np.uint8), format="rgb24")
            for pkt in vs.encode(frame):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if aus is not None:
            n = int(AUDIO_SAMPLING_RATE * len(colors) / fps)
            t = np.arange(n) / AUDIO_SAMPLING_RATE
            wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None]
            step = 1024
            for i in range(0, n, step):
                af = av.AudioFrame.from_ndarray(wave[:, i : i + step].copy(), format="fltp", layout="mono")
                af.sample_rate = AUDIO_SAMPLING_RATE
                for pkt in aus.encode(af):
                    c.mux(pkt)
            for pkt in aus.encode():
                c.mux(pkt)
    return path
