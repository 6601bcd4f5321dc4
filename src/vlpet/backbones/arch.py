"""Per-architecture table: where things live inside an unmodified Hugging Face encoder-decoder.

Every PET module is placed by name through this table, so supporting a new architecture is one
`ArchSpec` entry. Paths are dotted attribute paths; sub-layer paths are relative to one layer.

A *sub-layer* names the module whose output is the frozen H (`wrap`) and the module whose input is
the gate's X (`capture`; None means the wrapped module's own first input). This encodes spec §1.5:
BART (post-LN) gates read the layer input; T5 and other pre-LN models read the un-normalised
residual stream, i.e. the input of the sub-layer's LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import ConfigError


@dataclass(frozen=True)
class Sublayer:
    wrap: str
    capture: str | None = None
    output_index: int | None = None  # index of H in a tuple output; None for a plain tensor


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    family: str  # preset family (vlpet.presets): "bart" or "t5" settings (sizes, s, lr, zero-init)
    encoder: str  # path of the encoder stack (has the embedding / layers)
    encoder_layers: str
    decoder_layers: str
    shared_embedding: str
    sublayers: dict[str, Sublayer]
    projections: dict[str, str]  # "<stack>.<sublayer>.<q|k|v|o>" -> path relative to a layer
    # Modules that must see only the text part of the joint [text ; visual] sequence (spec §3.3).
    text_only_positions: str | None = None
    text_only_norm: str | None = None
    relative_bias: str | None = None  # embedding whose output is the [q, k, heads] bias
    # Whether the attention's own backward keeps its output O (the fused SDPA kernels do). Then, with the PET
    # activations recomputed (vlpet.recompute), an attention sub-layer's output projection moves into the
    # recomputed region and H = W_o·O is not stored. False for T5: its position bias runs the unfused
    # attention, whose backward keeps the probabilities, not O, so the move would save nothing.
    attention_keeps_output: bool = True
    norm: str = "layernorm"  # "layernorm" (with bias) or "rms" (T5: weight only, no mean)
    norm_eps: float = 1e-5
    # Initialisation the official code gives new modules (spec §1.4): "normal" = N(0, init_std)
    # weights and zero bias (BART's _init_weights hook), "torch" = PyTorch defaults (T5 ignores
    # plain nn.Linear in its _init_weights).
    init: str = "normal"
    init_std: float = 0.02
    new_vocab_row_std: float = 0.02  # T5: nn.Embedding's N(0, 1)
    notes: str = ""
    extra: dict = field(default_factory=dict)
    # Vision-language models that define their own input path (issue 18): the paths above are rooted at
    # the VLM; `image_path` names how images reach the language encoder (vlpet.backbones.vlm), and
    # nothing of the VL-BART input machinery (text-only wrappers, the 200 added tokens, vlpet's visual
    # embedding) is applied. None: a plain seq2seq LM (VL-BART / VL-T5 input path, or plain text).
    image_path: str | None = None
    language_model: str = ""  # root of the language encoder-decoder ("" = the whole model)
    projector: str | None = None  # the vision-to-language projector: the `visual_embedding` extra
    vision_parts: tuple[str, ...] = ()  # frozen in every method (the paper's frozen CLIP)
    text_model_types: tuple[str, ...] = ()  # composite configs: the allowed text_config.model_type
    # Decoder-only VLMs (issue 20, vlpet.decoder_only): one stack of LM layers, addressed by the "encoder.*"
    # placements (it reads image + prompt, the paper encoder's job); `decoder_layers` is "" (none).
    decoder_only: bool = False


_BART_SUBLAYERS = {
    "encoder.self_attn": Sublayer("self_attn", None, 0),
    "encoder.ffn": Sublayer("fc2", "fc1", None),
    "decoder.self_attn": Sublayer("self_attn", None, 0),
    "decoder.cross_attn": Sublayer("encoder_attn", None, 0),
    "decoder.ffn": Sublayer("fc2", "fc1", None),
}
# Pre-LN BART descendants (mBART, Pegasus, Marian-style with normalize_before): the gate reads the
# residual stream, i.e. the input of the sub-layer's LayerNorm.
_PRELN_BART_SUBLAYERS = {
    "encoder.self_attn": Sublayer("self_attn", "self_attn_layer_norm", 0),
    "encoder.ffn": Sublayer("fc2", "final_layer_norm", None),
    "decoder.self_attn": Sublayer("self_attn", "self_attn_layer_norm", 0),
    "decoder.cross_attn": Sublayer("encoder_attn", "encoder_attn_layer_norm", 0),
    "decoder.ffn": Sublayer("fc2", "final_layer_norm", None),
}


def _bart_projections() -> dict[str, str]:
    out = {}
    for stack, subs in (("encoder", {"self_attn": "self_attn"}),
                        ("decoder", {"self_attn": "self_attn", "cross_attn": "encoder_attn"})):
        for sub, attr in subs.items():
            for p in "qkvo":
                out[f"{stack}.{sub}.{p}"] = f"{attr}.{'out' if p == 'o' else p}_proj"
    return out


def _t5_projections() -> dict[str, str]:
    out = {}
    for key, attr in (("encoder.self_attn", "layer.0.SelfAttention"),
                      ("decoder.self_attn", "layer.0.SelfAttention"),
                      ("decoder.cross_attn", "layer.1.EncDecAttention")):
        for p in "qkvo":
            out[f"{key}.{p}"] = f"{attr}.{p}"
    return out


BART = ArchSpec(
    name="bart",
    model_types=("bart",),
    family="bart",
    encoder="model.encoder",
    encoder_layers="model.encoder.layers",
    decoder_layers="model.decoder.layers",
    shared_embedding="model.shared",
    sublayers=_BART_SUBLAYERS,
    projections=_bart_projections(),
    text_only_positions="model.encoder.embed_positions",
    text_only_norm="model.encoder.layernorm_embedding",
    norm="layernorm",
    init="normal",
    init_std=0.02,
    new_vocab_row_std=0.02,
    notes="post-LN; the gate's X is the layer input (spec §1.5)",
)

T5 = ArchSpec(
    name="t5",
    model_types=("t5", "mt5", "umt5"),
    family="t5",
    encoder="encoder",
    encoder_layers="encoder.block",
    decoder_layers="decoder.block",
    shared_embedding="shared",
    sublayers={
        "encoder.self_attn": Sublayer("layer.0.SelfAttention", "layer.0.layer_norm", 0),
        "encoder.ffn": Sublayer("layer.1.DenseReluDense", "layer.1.layer_norm", None),
        "decoder.self_attn": Sublayer("layer.0.SelfAttention", "layer.0.layer_norm", 0),
        "decoder.cross_attn": Sublayer("layer.1.EncDecAttention", "layer.1.layer_norm", 0),
        "decoder.ffn": Sublayer("layer.2.DenseReluDense", "layer.2.layer_norm", None),
    },
    projections=_t5_projections(),
    relative_bias="encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
    attention_keeps_output=False,
    norm="rms",
    norm_eps=1e-6,
    init="torch",
    new_vocab_row_std=1.0,
    notes="pre-LN; the gate's X is the un-normalised residual stream (spec §1.5)",
)

MBART = ArchSpec(
    name="mbart",
    model_types=("mbart",),
    family="bart",
    encoder="model.encoder",
    encoder_layers="model.encoder.layers",
    decoder_layers="model.decoder.layers",
    shared_embedding="model.shared",
    sublayers=_PRELN_BART_SUBLAYERS,
    projections=_bart_projections(),
    text_only_positions="model.encoder.embed_positions",
    text_only_norm="model.encoder.layernorm_embedding",
    notes="generic path: pre-LN BART descendant",
)

# Pegasus: like mBART, but sinusoidal positions and no layernorm_embedding.
PEGASUS = replace(MBART, name="pegasus", model_types=("pegasus",), text_only_norm=None,
                  notes="generic path: pre-LN, sinusoidal positions")



def _rooted(base: ArchSpec, root: str, **kw) -> ArchSpec:
    """`base`'s sub-layer table under `root` (the VLM's language encoder-decoder), without the
    VL-BART/VL-T5 text-only wrappers: the VLM keeps its own input path (image tokens get positions,
    layernorm_embedding and relative bias exactly as in its pretraining)."""
    def at(path):
        return f"{root}.{path}" if root else path
    return replace(base, encoder=at(base.encoder), encoder_layers=at(base.encoder_layers),
                   decoder_layers=at(base.decoder_layers), shared_embedding=at(base.shared_embedding),
                   text_only_positions=None, text_only_norm=None, relative_bias=None, language_model=root, **kw)


# Florence-2: `model.language_model` is a BartModel (post-LN, no head); lm_head sits on the VLM.
FLORENCE2 = replace(
    _rooted(replace(BART, encoder="encoder", encoder_layers="encoder.layers", decoder_layers="decoder.layers",
                    shared_embedding="shared"), "model.language_model"),
    name="florence2", model_types=("florence2",), image_path="florence2", projector="model.multi_modal_projector",
    vision_parts=("model.vision_tower",), text_model_types=("bart",),
    notes="Florence-2: DaViT + projector, image tokens merged into a post-LN BART encoder; gates read the layer input")

BLIP2_T5 = _rooted(T5, "language_model", name="blip2-t5", model_types=("blip-2",), image_path="blip2",
                   projector="language_projection", vision_parts=("vision_model", "qformer", "query_tokens"),
                   text_model_types=("t5", "mt5", "umt5"),
                   notes="BLIP-2 with a (Flan-)T5 LM: Q-Former queries merged into a pre-LN T5 encoder")

INSTRUCTBLIP_T5 = replace(BLIP2_T5, name="instructblip-t5", model_types=("instructblip",), image_path="instructblip",
                          notes="InstructBLIP with a (Flan-)T5 LM: the Q-Former also reads the instruction")



def _decoder_only(name: str, model_type: str, text_root: str, projector: str, vision_parts: tuple[str, ...],
                  text_model_types: tuple[str, ...], notes: str) -> ArchSpec:
    """A vision tower + projector feeding a pre-LN (RMS) decoder-only LM whose layers are named as Llama's
    (`input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`, `mlp`). The gate's X is the
    residual stream before each sub-layer's norm (spec §1.5, pre-LN), i.e. the norm's input."""
    layers = f"{text_root}.layers"
    return ArchSpec(
        name=name, model_types=(model_type,), family="decoder", encoder=text_root, encoder_layers=layers,
        decoder_layers="", shared_embedding=f"{text_root}.embed_tokens",
        sublayers={"encoder.self_attn": Sublayer("self_attn", "input_layernorm", 0),
                   "encoder.ffn": Sublayer("mlp", "post_attention_layernorm", None)},
        projections={f"encoder.self_attn.{p}": f"self_attn.{p}_proj" for p in "qkvo"},
        norm="rms", norm_eps=1e-6, init="normal", init_std=0.02, image_path=model_type, language_model=text_root,
        projector=projector, vision_parts=vision_parts, text_model_types=text_model_types, decoder_only=True,
        notes=notes)


# Llama-family LMs share the layer names; Gemma-2/3 (PaliGemma 2) put extra norms around each sub-layer.
LLAVA = _decoder_only("llava", "llava", "model.language_model", "model.multi_modal_projector",
                      ("model.vision_tower",), ("llama", "mistral", "qwen2"),
                      "LLaVA(-1.5): CLIP tower + MLP projector, image tokens merged into a Llama-style LM")
IDEFICS3 = _decoder_only("idefics3", "idefics3", "model.text_model", "model.connector", ("model.vision_model",),
                         ("llama",), "Idefics3 / SmolVLM: SigLIP tower + pixel-shuffle connector, Llama LM")
QWEN2_VL = _decoder_only("qwen2-vl", "qwen2_vl", "model.language_model", "model.visual.merger",
                         ("model.visual.patch_embed", "model.visual.blocks"), ("qwen2_vl_text",),
                         "Qwen2-VL: ViT with 2x2 patch merger (the projector), M-RoPE Qwen2 LM")
QWEN2_5_VL = replace(QWEN2_VL, name="qwen2.5-vl", model_types=("qwen2_5_vl",), image_path="qwen2_5_vl",
                     text_model_types=("qwen2_5_vl_text",),
                     notes="Qwen2.5-VL: windowed ViT with patch merger (the projector), M-RoPE Qwen2 LM")
PALIGEMMA = _decoder_only("paligemma", "paligemma", "model.language_model", "model.multi_modal_projector",
                          ("model.vision_tower",), ("gemma",),
                          "PaliGemma: SigLIP tower + linear projector, Gemma LM; image + prompt attend "
                          "bidirectionally (a prefix LM)")
DECODER_ONLY_ARCHITECTURES = (LLAVA, IDEFICS3, QWEN2_VL, QWEN2_5_VL, PALIGEMMA)

ARCHITECTURES: tuple[ArchSpec, ...] = (BART, T5, MBART, PEGASUS, FLORENCE2, BLIP2_T5, INSTRUCTBLIP_T5,
                                       *DECODER_ONLY_ARCHITECTURES)
VLM_ARCHITECTURES = (FLORENCE2, BLIP2_T5, INSTRUCTBLIP_T5, *DECODER_ONLY_ARCHITECTURES)
# Known VLMs without an entry (decoder-only LMs, or a BLIP-2 with OPT): the error names what is supported.
SUPPORTED_VLMS = ("Florence2ForConditionalGeneration", "Blip2ForConditionalGeneration with a T5/Flan-T5 LM",
                  "InstructBlipForConditionalGeneration with a T5/Flan-T5 LM",
                  "LlavaForConditionalGeneration (Llama/Mistral/Qwen2 LM)", "Idefics3ForConditionalGeneration",
                  "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                  "PaliGemmaForConditionalGeneration (Gemma LM)")


def arch_for(model_type: str, config=None) -> ArchSpec:
    """The table entry for a config's `model_type`; composite (VLM) configs also check the language model."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            if spec.text_model_types and config is not None:
                text = getattr(getattr(config, "text_config", None), "model_type", None)
                if text not in spec.text_model_types:
                    raise ConfigError(
                        f"backbone {model_type!r} with a {text!r} language model is not supported (expected "
                        f"text_config.model_type in {', '.join(spec.text_model_types)}); supported VLMs: "
                        f"{'; '.join(SUPPORTED_VLMS)}")
            return spec
    known = sorted(t for s in ARCHITECTURES if not s.image_path for t in s.model_types)
    if config is not None and (hasattr(config, "vision_config") or hasattr(config, "text_config")):
        raise ConfigError(f"vision-language backbone model_type {model_type!r} is not supported; supported VLMs: "
                          f"{'; '.join(SUPPORTED_VLMS)} (plain seq2seq LMs: {', '.join(known)})")
    raise ConfigError(
        f"backbone model_type {model_type!r} has no entry in vlpet's architecture table; "
        f"supported: {', '.join(known)}; VLMs: {'; '.join(SUPPORTED_VLMS)} "
        f"(add an ArchSpec in vlpet/backbones/arch.py)"
    )
