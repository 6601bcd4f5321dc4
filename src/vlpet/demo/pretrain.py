"""A tiny BART-architecture text model, pretrained locally for the offline demo (cached).

No pretrained BART or T5 is available offline, and a VL-PET demo on a *random* frozen backbone
would show nothing. ``pretrain_demo_plm()`` therefore pretrains a small
``BartForConditionalGeneration`` on text, with BART's own objective, for a fixed CPU budget
(~2.5 minutes on 2 cores by default), and caches it. **It is a tiny text-only model pretrained by
vlpet on ~1 MB of offline text, not facebook/bart-base**; every artefact says so (``README.md``,
``config.json`` key ``vlpet_note``, ``pretrain_log.json``).

Recipe (all seeded)
  * Text: :mod:`vlpet.demo.corpus` — the demo's own language (easy-VQA train question strings,
    captions and two-image statements: 1,575 distinct sentences, ~13k tokens) and 1 MB of English
    prose that ships with Python (``pydoc_data.topics`` and standard-library docstrings, ~240k
    tokens).
  * Tokenizer: byte-level BPE trained with ``tokenizers`` (vocab 3,000; ``<s> <pad> </s> <unk>
    <mask>`` = ids 0..4, BART's order; ``<mask>`` strips the space before it, as in BART). The
    demo sentences are repeated in the BPE training text so that both halves weigh the same as in
    the training mix (then 56 of the 58 demo words are single tokens; "colors" and "neither" are
    two). ``add_prefix_space``: a text's first word gets the token it has inside a sentence
    ("circle" -> "Ġcircle"), so the bare answers that VQA and NLVR targets are made of are the
    well-trained in-sentence tokens (one token each for the 11 shape/colour answers, "no", "true"
    and "false"; "yes", absent from the training text, is "Ġy"+"es"); without it (tokenizer v1)
    "circle" was "c"+"ir"+"cle" and "blue" "b"+"l"+"ue", tokens the frozen decoder had hardly ever produced, and the PET
    methods that keep the decoder frozen could not learn to emit them. Saved as ``vocab.json`` +
    ``merges.txt`` (plus ``tokenizer.json`` and ``tokenizer_config.json``):
    ``BartTokenizerFast.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
    load it (transformers 5 resolves both to its Roberta/BART byte-level BPE class).
  * Examples (``seq_len`` = 48 tokens with specials): with probability ``demo_fraction`` (0.5)
    a run of random demo sentences, else a chunk of consecutive sentences of one English
    paragraph (2% of the chunks are held out for evaluation); with ``scene_fraction`` > 0 (0 in the
    demo) that share of the examples is a text-only scene with questions and answers
    (:func:`vlpet.demo.corpus.scene_documents`; also in the tokenizer's training text). BART noise, as in the paper's
    final model: *sentence permutation* (the chunk's sentences are shuffled) then *text
    infilling* (30% of the words masked — exactly round(0.3 x words) — in spans of Poisson(3)
    words, each span replaced by one ``<mask>``; a 0-length span inserts a ``<mask>``; spans go
    into distinct gaps so they never merge). The target is the original chunk ``<s> text </s>``;
    the decoder starts with ``</s>`` (``decoder_start_token_id`` = 2), as VL-BART fine-tuning does.
  * Copy warm-up (a curriculum step that is *not* in BART's recipe): before denoising, the model
    copies random token strings (24 tokens, uniform over the vocabulary) until its teacher-forced
    token accuracy reaches 0.9 (5-step mean; at most 400 steps or 30% of the budget; measured:
    ~85 steps, ~15 s), or for exactly ``copy_warmup_steps`` steps when that is set (the demo
    sets 90, so that no step count depends on a measurement). Without it the model stayed in the "language-model prior" regime for the
    whole budget: after 430 denoising steps it produced the same sentence for every input and its
    held-out English token accuracy was 0.18-0.22 (it never looked at the encoder); with it the
    copying circuit forms first and the denoiser uses its input (accuracy 0.46, see below).
  * Model: ``BartConfig`` d_model 256, 3 encoder + 3 decoder layers, 4 heads, FFN 1024,
    max_position_embeddings 128, post-LN, GELU — bart-base's shape scaled down, 6.37 M
    parameters with the 3,000-token vocabulary. Dropout 0 while pretraining (0.1 learned
    measurably slower in this budget); set ``config.dropout`` when fine-tuning if wanted.
  * Optimisation: AdamW (lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.01 except biases
    and LayerNorms), batch 16, gradient clipping 1.0; the copy warm-up ramps the lr up over 30
    steps, then denoising decays it linearly to 10% of the peak. The number of denoising steps is
    ``max_steps`` if given (fully deterministic), else calibrated so that both phases together
    last ``budget_s``: the step time is measured on denoising steps 2-5 and re-measured at 10%
    and 50% of the plan; the loop also stops at 1.1 x ``budget_s`` whatever the plan.

The demo (``vlpet.demo.run``) uses ``max_steps=300`` and ``copy_warmup_steps=90``: a fixed
number of steps, so the same seed gives the same PLM on any machine (a time budget made the PLM,
and every demo score, depend on the machine's speed and load: on a busy 2-core machine the 150 s
budget once bought 31 denoising steps and a copy warm-up that never converged). Measured on this
project's 2-core machine with 1 thread: 90 copy steps (~26 s) + 300 denoising steps (~0.5 s
each), 183 s of training, ~200 s in all; held-out English token accuracy 0.30, demo 0.66.

Measured with the time budget (tokenizer v1; 2 cores of an Intel Xeon, ``taskset -c 0,1``, torch 2.11 CPU threads 2, default
settings, ``budget_s=150``): copy warm-up 83 steps / 15 s, then 571 denoising steps (0.25 s each),
157 s of training and 164 s in all (plus ~3-12 s to build the corpus the first time), 662k
tokens seen. Held-out denoising loss 8.04 -> 2.12 (English 8.03 -> 3.52, demo 8.05 -> 0.72);
teacher-forced token accuracy English 0.01 -> 0.46, demo 0.00 -> 0.70. Greedy reconstructions:
"a large red <mask> in the top left corner" -> "a large red triangle in the top left corner ...",
"Return the <mask> of the string." -> "Return the string of the string of the string." — it
follows its input but still repeats itself: a tiny, briefly trained model. With 2+2 layers
(4.5 M parameters) the same budget gives 783 steps and English loss 3.12 / accuracy 0.48.

Cache: ``{cache_dir or $VLPET_CACHE or ~/.cache/vlpet}/demo-plm-<hash>``, the hash covering the
model and training configuration, the corpus text, the seed and the budget. A folder holding
``pretrain_log.json`` is reused as is. The corpus itself is cached next to it
(``demo-corpus-<hash>.json``) because extracting the docstrings takes ~10 s.

``pretrain_log.json`` holds the loss curve, timings, tokens seen, corpus size, the denoising loss
on fixed held-out examples before and after training, and a few greedy reconstructions of masked
sentences.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "pretrain_demo_plm",
    "default_cache_root",
    "DEFAULT_MODEL_CONFIG",
    "DEFAULT_TRAIN_CONFIG",
    "PLM_NOTE",
    "SPECIAL_TOKENS",
    "train_bpe_tokenizer",
    "denoise",
]

CODE_VERSION = 2  # bump when a change alters the corpus, the noise or the training (cache key)
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, BART's order
BOS, PAD, EOS, UNK, MASK = range(5)

PLM_NOTE = (
    "vlpet demo PLM: a TINY text-only BART-architecture model pretrained locally by vlpet "
    "(BART denoising on ~1 MB of offline text, a few CPU minutes). It is NOT facebook/bart-base "
    "and no result obtained with it is comparable to the paper's."
)

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "d_model": 256,
    "encoder_layers": 3,
    "decoder_layers": 3,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "max_position_embeddings": 128,
    "dropout": 0.0,  # 0.1 (bart-base's) learns measurably slower in this budget; set it when fine-tuning
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "activation_function": "gelu",
    "scale_embedding": False,
}

DEFAULT_TRAIN_CONFIG: dict[str, Any] = {
    "vocab_size": 3000,
    "seq_len": 48,
    "batch_size": 16,
    "lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "betas": [0.9, 0.98],
    "eps": 1e-6,
    "grad_clip": 1.0,
    "mask_ratio": 0.3,
    "poisson_lambda": 3.0,
    "permute_sentences": True,
    "demo_fraction": 0.5,
    # share of text-only scene documents with questions and answers (corpus.scene_documents); 0 in the
    # demo (docs/demo/why-not-95.md); the rest of the mix is demo_fraction demo text, then English
    "scene_fraction": 0.0,
    "english_max_chars": 1_000_000,
    "heldout_fraction": 0.02,
    "n_eval_examples": 64,
    # copy warm-up (a curriculum step that is not part of BART's recipe, see the module docstring)
    "copy_warmup_max_steps": 400,
    "copy_warmup_len": 24,
    "copy_warmup_target_acc": 0.9,
    "copy_warmup_max_frac": 0.3,
    # a fixed number of copy steps (no accuracy or time criterion): with max_steps, every step
    # count is then fixed in advance and the same seed gives the same model on any machine
    "copy_warmup_steps": None,
}


def default_cache_root() -> Path:
    return Path(os.environ.get("VLPET_CACHE") or "~/.cache/vlpet").expanduser()


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:n]


# ------------------------------------------------------------------------------------------------
# corpus and tokenizer
# ------------------------------------------------------------------------------------------------
def _load_corpus(cache_root: Path, max_chars: int, say: Callable[[str], None]) -> dict:
    from . import corpus as C

    try:
        import easy_vqa  # noqa: F401

        has_evqa = True
    except ImportError:  # pragma: no cover
        has_evqa = False
    key = _digest({"v": CODE_VERSION, "python": platform.python_version(), "stdlib": sys.base_prefix,
                   "easy_vqa": has_evqa, "max_chars": max_chars})
    path = cache_root / f"demo-corpus-{key}.json"
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, json.JSONDecodeError):
            pass
    t0 = time.perf_counter()
    demo = C.demo_sentences()
    english, info = C.english_documents(max_chars)
    data = {"demo": demo, "english": english, "info": info, "digest": C.corpus_digest(demo, english)}
    say(f"[demo-plm] built the text corpus in {time.perf_counter() - t0:.1f}s: {len(demo)} demo sentences, "
        f"{info['chars']:,} chars of English in {info['paragraphs']:,} paragraphs")
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False)
    os.replace(tmp, path)
    return data


def train_bpe_tokenizer(texts, vocab_size: int, folder: str | os.PathLike, model_max_length: int = 128):
    """Train a byte-level BPE on ``texts`` (an iterable of strings), save ``vocab.json`` +
    ``merges.txt`` (+ ``tokenizer.json``/``tokenizer_config.json``) in ``folder`` and return the
    ``BartTokenizerFast`` loaded from it."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import BartTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # add_prefix_space: a text's first word gets the same token as inside a sentence ("yes" ->
    # "Ġyes"). Bare answers ("yes", "circle", "true") are what VQA/NLVR targets are made of, and a
    # 3,000-token vocabulary has no room for the space-less twin of every word: without it "yes"
    # was "y"+"es" and "blue" "b"+"l"+"ue", tokens the frozen decoder had hardly ever produced.
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    bpe.save_model(str(folder))
    tok = BartTokenizerFast.from_pretrained(
        str(folder),
        add_prefix_space=True,
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True),
        model_max_length=model_max_length,
    )
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..4")
    tok.save_pretrained(str(folder))
    return tok


# ------------------------------------------------------------------------------------------------
# noising
# ------------------------------------------------------------------------------------------------
def denoise(
    sentences: list[tuple[list[int], list[int]]],
    rng: np.random.Generator,
    word_start: np.ndarray,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
    permute: bool = True,
    max_len: int = 64,
) -> tuple[list[int], list[int]]:
    """BART noise for one example. ``sentences``: (ids without, ids with a leading space) per
    sentence; ``word_start[id]``: whether token ``id`` starts a word (byte-level "Ġ").

    Returns (source ids, target ids), both wrapped in ``<s> ... </s>`` and at most ``max_len``.
    """
    def join(order):
        out: list[int] = []
        for j, k in enumerate(order):
            out.extend(sentences[k][0] if j == 0 else sentences[k][1])
        return out[: max_len - 2]

    target = join(range(len(sentences)))
    order = rng.permutation(len(sentences)) if (permute and len(sentences) > 1) else range(len(sentences))
    tokens = join(order)
    # words: a word starts at a word-start token (and at position 0)
    starts = [i for i, t in enumerate(tokens) if i == 0 or word_start[t]]
    n_words = len(starts)
    bounds = starts + [len(tokens)]
    n_mask = int(round(n_words * mask_ratio))
    src: list[int] = []
    if n_mask == 0:
        src = list(tokens)
    else:
        # span lengths ~ Poisson(lambda) until they cover n_mask words (the last one trimmed)
        lengths: list[int] = []
        while sum(lengths) < n_mask:
            lengths.append(int(rng.poisson(poisson_lambda)))
        lengths[-1] -= sum(lengths) - n_mask
        n_keep = n_words - n_mask
        if len(lengths) > n_keep + 1:  # more spans than gaps between kept words: merge the excess
            lengths = lengths[:n_keep] + [sum(lengths[n_keep:])]
        # each span goes into a distinct gap between kept words (so exactly n_mask words are
        # masked and spans never touch); a 0-length span inserts a <mask>
        slots = rng.choice(n_keep + 1, size=len(lengths), replace=False)
        span_at = {int(g): ln for g, ln in zip(slots, lengths)}
        w = 0
        for u in range(n_keep + 1):
            if u in span_at:
                src.append(MASK)
                w += span_at[u]
            if u < n_keep:
                src.extend(tokens[bounds[w] : bounds[w + 1]])
                w += 1
    return [BOS] + src[: max_len - 2] + [EOS], [BOS] + target + [EOS]


class _Sampler:
    """Builds (source, target) examples from the tokenized corpus."""

    def __init__(self, tok, corpus: dict, cfg: dict, seed: int):
        L = int(cfg["seq_len"]) - 2
        self.cfg, self.L = cfg, L
        vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
        self.word_start = np.array([isinstance(t, str) and t.startswith("Ġ") for t in vocab], dtype=bool)

        def encode(texts):
            kw = dict(add_special_tokens=False, truncation=True, max_length=L)
            a = tok(texts, **kw)["input_ids"]
            b = tok([" " + t for t in texts], **kw)["input_ids"]
            return [(x, y) for x, y in zip(a, b)]

        self.demo = encode(corpus["demo"])
        self.scene = [encode(doc) for doc in corpus.get("scene", [])]
        flat, doc_of = [], []
        for d, doc in enumerate(corpus["english"]):
            flat.extend(doc)
            doc_of.extend([d] * len(doc))
        enc = encode(flat) if flat else []
        # pack consecutive sentences of a paragraph into chunks of <= L tokens
        chunks: list[list[tuple[list[int], list[int]]]] = []
        cur: list = []
        cur_len, cur_doc = 0, None
        for (a, b), d in zip(enc, doc_of):
            if cur and (d != cur_doc or cur_len + len(b) > L):
                chunks.append(cur)
                cur, cur_len = [], 0
            cur.append((a, b))
            cur_len += len(b)
            cur_doc = d
        if cur:
            chunks.append(cur)
        order = np.random.default_rng(seed + 1).permutation(len(chunks))
        n_held = int(round(len(chunks) * float(cfg["heldout_fraction"]))) if len(chunks) > 1 else 0
        self.eval_chunks = [chunks[i] for i in order[:n_held]] or chunks[:1]
        self.train_chunks = [chunks[i] for i in order[n_held:]] or chunks
        self.english_tokens = sum(len(b) for b in (x for c in chunks for _, x in c))
        self.demo_tokens = sum(len(b) for _, b in self.demo)

    def _demo_run(self, rng) -> list:
        out, n = [], 0
        while True:
            s = self.demo[int(rng.integers(len(self.demo)))]
            if out and n + len(s[1]) > self.L:
                return out
            out.append(s)
            n += len(s[1])

    def example(self, rng, split: str = "train", kind: str | None = None) -> tuple[list[int], list[int]]:
        """``split`` train / eval (held-out English chunks); ``kind`` demo / english / None (mix)."""
        cfg = self.cfg
        chunks = self.train_chunks if split == "train" else self.eval_chunks
        if kind is None:
            if not chunks:
                kind = "demo"
            else:  # one draw, as before scene documents existed: with scene_fraction 0 the same examples
                u, sf = rng.random(), float(cfg["scene_fraction"])
                kind = "scene" if u < sf else "demo" if u < sf + float(cfg["demo_fraction"]) else "english"
        if kind == "scene" and self.scene:
            sents = self.scene[int(rng.integers(len(self.scene)))]
        elif kind == "demo" or not chunks:
            sents = self._demo_run(rng)
        else:
            sents = chunks[int(rng.integers(len(chunks)))]
        return denoise(sents, rng, self.word_start, float(cfg["mask_ratio"]), float(cfg["poisson_lambda"]),
                       bool(cfg["permute_sentences"]), int(cfg["seq_len"]))


def _collate(examples, torch):
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples)
    ids = torch.full((len(examples), S), PAD, dtype=torch.long)
    att = torch.zeros((len(examples), S), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        labels[i, : len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def _evaluate(model, sets: dict, torch) -> dict:
    """Per eval set: mean token loss and teacher-forced next-token accuracy (a model that copies
    the unmasked 70% of the input gets well above 0.7; a pure language model stays far below)."""
    model.eval()
    res = {}
    with torch.no_grad():
        for name, batches in sets.items():
            tot, n, correct = 0.0, 0, 0
            for b in batches:
                out = model(**b)
                valid = b["labels"] != -100
                k = int(valid.sum())
                tot += float(out.loss) * k
                n += k
                correct += int(((out.logits.argmax(-1) == b["labels"]) & valid).sum())
            res[name] = {"loss": round(tot / max(n, 1), 4), "token_accuracy": round(correct / max(n, 1), 4)}
    model.train()
    return res


#: masked sentences decoded greedily after training (the first three are demo language)
RECONSTRUCTION_PROBES = (
    "what <mask> is the triangle?",
    "a large red <mask> in the top left corner",
    "the two shapes have the same <mask>",
    "Return the <mask> of the string.",
)


def _reconstruct(model, tok, texts, torch, max_new_tokens: int = 32) -> list[dict]:
    model.eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            gen = model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens,
                                 decoder_start_token_id=EOS)
            out.append({"input": t, "output": tok.decode(gen[0], skip_special_tokens=True).strip()})
    model.train()
    return out


# ------------------------------------------------------------------------------------------------
# main entry point
# ------------------------------------------------------------------------------------------------
def _resolve_configs(model_config, train_config, budget_s, max_steps) -> tuple[dict, dict]:
    """The model / training settings (defaults + overrides), checked before any work."""
    from transformers import BartConfig

    mcfg = {**DEFAULT_MODEL_CONFIG, **(model_config or {})}
    tcfg = {**DEFAULT_TRAIN_CONFIG, **(train_config or {})}
    unknown = set(model_config or {}) - set(DEFAULT_MODEL_CONFIG) - set(BartConfig().to_dict())
    if unknown:
        raise ValueError(f"unknown model_config keys: {sorted(unknown)}")
    unknown = set(train_config or {}) - set(DEFAULT_TRAIN_CONFIG)
    if unknown:
        raise ValueError(f"unknown train_config keys: {sorted(unknown)}; known: {sorted(DEFAULT_TRAIN_CONFIG)}")
    if max_steps is None and not (budget_s and budget_s > 0):
        raise ValueError("give budget_s > 0 or max_steps")
    if int(tcfg["seq_len"]) > int(mcfg["max_position_embeddings"]):
        raise ValueError("seq_len must be <= max_position_embeddings")
    return mcfg, tcfg


def _corpus_and_key(cache_root: Path, mcfg: dict, tcfg: dict, seed: int, budget_s, max_steps,
                    say: Callable[[str], None]) -> tuple[dict, str]:
    """The training text and the cache key of the PLM it gives (every input of the run is in the key)."""
    corpus = _load_corpus(cache_root, int(tcfg["english_max_chars"]), say)
    key_tcfg = dict(tcfg)
    if not float(tcfg["scene_fraction"]):
        del key_tcfg["scene_fraction"]  # the cache key of a PLM without scene text stays what it was
    else:
        from .corpus import scene_documents

        corpus = {**corpus, "scene": scene_documents(seed)}
        key_tcfg["scene_documents"] = _digest(corpus["scene"])
    key = _digest({"v": CODE_VERSION, "model": mcfg, "train": key_tcfg, "seed": seed, "corpus": corpus["digest"],
                   "budget_s": None if max_steps is not None else float(budget_s), "max_steps": max_steps})
    return corpus, key


def _tokenizer_for(corpus: dict, mcfg: dict, tcfg: dict, folder: Path):
    """The byte-level BPE of English + demo text (repeated to its share) + scenes; returns (tok, demo_chars,
    repeat)."""
    demo_chars = sum(len(s) for s in corpus["demo"]) or 1
    eng = [s for doc in corpus["english"] for s in doc]
    eng_chars = sum(len(s) for s in eng)
    frac = float(tcfg["demo_fraction"])
    repeat = max(1, int(round(frac / max(1e-9, 1 - frac) * eng_chars / demo_chars))) if eng_chars else 1
    scene = [x for doc in corpus.get("scene", []) for x in doc]
    tok = train_bpe_tokenizer(eng + corpus["demo"] * repeat + scene, int(tcfg["vocab_size"]), folder,
                              model_max_length=int(mcfg["max_position_embeddings"]))
    return tok, demo_chars, repeat


def _new_model(tok, mcfg: dict, seed: int):
    """A randomly initialised BART of `mcfg` (seeded), with neutral generation settings of the demo's tokens."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(tok), pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        decoder_start_token_id=EOS, forced_eos_token_id=EOS, is_encoder_decoder=True,
        **mcfg,
    )
    config.vlpet_note = PLM_NOTE
    model = BartForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = EOS
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.train()
    return model


def _denoise_lr(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """Denoising-phase lr: linear warm-up over `warmup` steps (0 after a copy warm-up), then linear decay to
    `floor` x peak at `total`. Not train.optim's schedule: that one decays to 0 and knows no copy phase."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(floor, 1.0 - (1.0 - floor) * (step - warmup) / max(1, total - warmup))


class _Loop:
    """One optimizer step at a given lr (AdamW groups of vlpet.train.optim, gradient clipping), the loss curve
    and the token counts shared by both phases."""

    def __init__(self, model, tcfg: dict):
        from ..train.optim import build_optimizer

        self.model = model
        # biases and norm weights without decay: for BART the same groups as "ndim < 2 or a LayerNorm"
        self.opt = build_optimizer(model, float(tcfg["lr"]), float(tcfg["weight_decay"]), eps=float(tcfg["eps"]),
                                   betas=tuple(tcfg["betas"]), fused=False)
        self.grad_clip = float(tcfg["grad_clip"])
        self.curve: list[list] = []
        self.tokens_src = self.tokens_tgt = 0
        self.t_loop = self.last_print = time.perf_counter()

    def step(self, batch, lr: float, with_acc: bool = False) -> tuple[float, float | None, float]:
        """(loss, token accuracy when asked, seconds of the step)."""
        import torch

        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = lr
        out = self.model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        acc = None
        if with_acc:
            valid = batch["labels"] != -100
            acc = float(((out.logits.detach().argmax(-1) == batch["labels"]) & valid).sum()) / max(1, int(valid.sum()))
        seconds = time.perf_counter() - t0
        self.tokens_src += int(batch["attention_mask"].sum())
        self.tokens_tgt += int((batch["labels"] != -100).sum())
        return out.loss.item(), acc, seconds

    def record(self, loss: float, now: float, phase: str) -> None:
        self.curve.append([len(self.curve) + 1, round(loss, 4), round(now - self.t_loop, 2), phase])

    def due(self, now: float, first: bool) -> bool:
        """Time for a progress line (every 15 s, and at the first step)."""
        if now - self.last_print > 15 or first:
            self.last_print = now
            return True
        return False


def _copy_warmup(loop: _Loop, rng, n_tokens: int, tcfg: dict, copy_max: int, budget: float, progress: bool,
                 say) -> tuple[int, list]:
    """Phase 1: random token strings copied verbatim, until `copy_warmup_steps`, or the accuracy target / the
    time share / `copy_max` steps; returns (steps, token accuracies)."""
    import torch

    peak, bs = float(tcfg["lr"]), int(tcfg["batch_size"])
    copy_fixed = tcfg["copy_warmup_steps"]
    copy_warm = min(int(tcfg["warmup_steps"]), copy_max)
    steps, accs = 0, []
    while steps < copy_max:
        body = rng.integers(len(SPECIAL_TOKENS), n_tokens, size=(bs, int(tcfg["copy_warmup_len"])))
        batch = _collate([([BOS, *map(int, r), EOS],) * 2 for r in body], torch)
        loss, acc, _ = loop.step(batch, peak * min(1.0, (steps + 1) / max(1, copy_warm)), True)
        steps += 1
        accs.append(acc)
        now = time.perf_counter()
        loop.record(loss, now, "copy")
        if progress and loop.due(now, steps == 1):
            say(f"[demo-plm] copy warm-up step {steps}  loss {loss:.3f}  token accuracy {acc:.2f}  {now - loop.t_loop:.0f}s")
        if copy_fixed is None and (
            (steps >= 5 and float(np.mean(accs[-5:])) >= float(tcfg["copy_warmup_target_acc"]))
            or now - loop.t_loop > float(tcfg["copy_warmup_max_frac"]) * budget
        ):
            break
    return steps, accs


def _denoising(loop: _Loop, sampler, rng, tcfg: dict, max_steps: int | None, budget: float, warmup: int,
               progress: bool, say) -> tuple[int, int, list, bool]:
    """Phase 2: BART denoising for `max_steps`, or for as many steps as the time budget allows (the plan is
    re-estimated at steps 5, total/10 and total/2); returns (steps, planned steps, step times, stopped early)."""
    import torch

    peak, floor, bs = float(tcfg["lr"]), float(tcfg["min_lr_ratio"]), int(tcfg["batch_size"])
    total = max_steps if max_steps is not None else 10**9
    calib_points: set[int] = set()
    step_times: list[float] = []
    t_phase = time.perf_counter()
    stopped_early = False
    step = 0
    while step < total:
        batch = _collate([sampler.example(rng) for _ in range(bs)], torch)
        loss, _, seconds = loop.step(batch, _denoise_lr(step, total, peak, floor, warmup))
        now = time.perf_counter()
        step_times.append(seconds)
        step += 1
        loop.record(loss, now, "denoise")
        elapsed = now - loop.t_loop
        if max_steps is None:
            if step == 5 or step in calib_points:
                recent = step_times[1:] if step == 5 else step_times[-max(5, step // 5):]
                overhead = (now - t_phase - sum(step_times)) / step  # example building, collation
                per_step = float(np.mean(recent)) + overhead
                total = max(step + 1, int(tcfg["warmup_steps"]) + 1,
                            step + int((budget - elapsed) / max(per_step, 1e-6)))
                if step == 5:
                    calib_points = {max(6, total // 10), max(7, total // 2)}
            if elapsed > 1.1 * budget:
                stopped_early = step < total
                break
        if progress and loop.due(now, step == total or step == 1):
            avg = float(np.mean([c[1] for c in loop.curve[-20:]]))
            say(f"[demo-plm] denoising step {step}/{total}  loss {avg:.3f}  "
                f"lr {_denoise_lr(step - 1, total, peak, floor, warmup):.2e}  "
                f"{elapsed:.0f}s  {loop.tokens_tgt / max(elapsed, 1e-9):.0f} target tok/s")
    return step, total, step_times, stopped_early


def _reconstruct_heldout(model, tok, eval_examples: dict, seq_len: int) -> list[dict]:
    """One held-out demo example and two English ones, noised as in training, decoded greedily."""
    import torch

    out = []
    for (src, tgt) in (eval_examples["demo"][0], eval_examples["english"][0], eval_examples["english"][1]):
        enc = torch.tensor([src])
        model.eval()
        with torch.no_grad():
            gen = model.generate(input_ids=enc, attention_mask=torch.ones_like(enc), num_beams=1,
                                 do_sample=False, max_new_tokens=min(48, seq_len), decoder_start_token_id=EOS)
        model.train()
        out.append({"input": tok.decode(src[1:-1]), "output": tok.decode(gen[0], skip_special_tokens=True).strip(),
                    "reference": tok.decode(tgt[1:-1])})
    return out


def pretrain_demo_plm(
    cache_dir: str | os.PathLike | None = None,
    budget_s: float = 150,
    seed: int = 0,
    progress: bool = True,
    *,
    model_config: dict | None = None,
    train_config: dict | None = None,
    max_steps: int | None = None,
    force: bool = False,
    num_threads: int | None = None,
) -> Path:
    """Pretrain (or reuse from the cache) the demo's tiny BART and return its folder.

    Args:
        cache_dir: parent folder of the cache (default ``$VLPET_CACHE`` or ``~/.cache/vlpet``).
        budget_s: wall-clock seconds for the training loop, copy warm-up included (ignored when
            ``max_steps`` is given); imports, corpus, tokenizer, evaluation and saving add
            ~7 s on 2 idle cores (~20-30 s more on the first call or on a busy CPU).
        seed: seeds the model initialisation, example sampling and noise.
        progress: print progress lines.
        model_config / train_config: overrides of :data:`DEFAULT_MODEL_CONFIG` /
            :data:`DEFAULT_TRAIN_CONFIG` (e.g. a tiny model for tests).
        max_steps: a fixed number of denoising steps instead of the time budget (then the run is
            deterministic; the copy warm-up before it stops on its accuracy target, after
            ``copy_warmup_max_steps`` or after ``max_steps`` steps, whichever comes first).
        force: retrain even if the cached folder exists.
        num_threads: torch CPU threads while training (default: leave torch's setting, which is
            the number of physical cores; on a CPU shared with other jobs 1 can be much faster).

    The folder loads with ``BartForConditionalGeneration.from_pretrained`` and
    ``BartTokenizerFast.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    import torch

    say = print if progress else (lambda *a, **k: None)
    mcfg, tcfg = _resolve_configs(model_config, train_config, budget_s, max_steps)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    t_start = time.perf_counter()
    corpus, key = _corpus_and_key(cache_root, mcfg, tcfg, seed, budget_s, max_steps, say)
    folder = cache_root / f"demo-plm-{key}"
    say(f"[demo-plm] {PLM_NOTE}")
    if (folder / "pretrain_log.json").is_file() and not force:
        say(f"[demo-plm] reusing the cached model {folder}")
        return folder

    prev_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    tmp = cache_root / f".demo-plm-{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        tok, demo_chars, repeat = _tokenizer_for(corpus, mcfg, tcfg, tmp)
        t_tok = time.perf_counter() - t0

        t0 = time.perf_counter()
        sampler = _Sampler(tok, corpus, tcfg, seed)
        erng = np.random.default_rng(seed + 2)
        n_eval = int(tcfg["n_eval_examples"])
        eval_examples = {k: [sampler.example(erng, "eval", k) for _ in range(n_eval // 2)] for k in ("english", "demo")}
        eval_sets = {k: [_collate(v[i : i + 32], torch) for i in range(0, len(v), 32)] for k, v in eval_examples.items()}
        t_data = time.perf_counter() - t0

        model = _new_model(tok, mcfg, seed)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"[demo-plm] pretraining a BART-architecture model with {n_params / 1e6:.2f} M parameters "
            f"(d_model {mcfg['d_model']}, {mcfg['encoder_layers']}+{mcfg['decoder_layers']} layers, vocab {len(tok)}) "
            + (f"for {max_steps} steps" if max_steps is not None else f"for ~{budget_s:.0f} s") + " on CPU")
        t0 = time.perf_counter()
        eval_before = _evaluate(model, eval_sets, torch)
        t_eval = time.perf_counter() - t0

        copy_fixed = tcfg["copy_warmup_steps"]
        copy_max = int(tcfg["copy_warmup_max_steps"]) if copy_fixed is None else int(copy_fixed)
        if max_steps is not None and copy_fixed is None:
            copy_max = min(copy_max, int(max_steps))
        loop = _Loop(model, tcfg)
        rng = np.random.default_rng(seed)
        budget = float(budget_s) if max_steps is None else float("inf")
        copy_steps, copy_accs = _copy_warmup(loop, rng, len(tok), tcfg, copy_max, budget, progress, say)
        t_copy = time.perf_counter() - loop.t_loop
        if copy_steps:
            say(f"[demo-plm] copy warm-up: {copy_steps} steps, {t_copy:.0f} s, token accuracy "
                f"{float(np.mean(copy_accs[-5:])):.2f}")
        warmup = 0 if copy_max > 0 else int(tcfg["warmup_steps"])  # no second warm-up after the copy phase
        step, total, step_times, stopped_early = _denoising(loop, sampler, rng, tcfg, max_steps, budget, warmup,
                                                            progress, say)
        t_train = time.perf_counter() - loop.t_loop

        t0 = time.perf_counter()
        eval_after = _evaluate(model, eval_sets, torch)
        recon = _reconstruct(model, tok, RECONSTRUCTION_PROBES, torch)
        recon += _reconstruct_heldout(model, tok, eval_examples, int(tcfg["seq_len"]))
        t_post = time.perf_counter() - t0

        loss_before = float(np.mean([v["loss"] for v in eval_before.values()]))
        loss_after = float(np.mean([v["loss"] for v in eval_after.values()]))
        tokens_src, tokens_tgt = loop.tokens_src, loop.tokens_tgt
        say(f"[demo-plm] held-out denoising loss {loss_before:.3f} -> {loss_after:.3f} after {step} steps "
            f"({t_train:.0f} s, {tokens_src + tokens_tgt:,} tokens seen); "
            + ", ".join(f"{k}: loss {eval_before[k]['loss']:.2f} -> {v['loss']:.2f}, token accuracy "
                        f"{eval_before[k]['token_accuracy']:.2f} -> {v['token_accuracy']:.2f}" for k, v in eval_after.items()))
        for r in recon:
            say(f"[demo-plm]   {r['input']!r} -> {r['output']!r}" + (f"  (original {r['reference']!r})" if "reference" in r else ""))

        model.save_pretrained(str(tmp))
        log = {
            "note": PLM_NOTE,
            "cache_key": key,
            "seed": seed,
            "budget_s": None if max_steps is not None else float(budget_s),
            "max_steps": max_steps,
            "steps": step,
            "planned_steps": total,
            "copy_warmup": {"steps": copy_steps, "time_s": round(t_copy, 2),
                            "final_token_accuracy": round(float(np.mean(copy_accs[-5:])), 4) if copy_accs else None},
            "stopped_early": stopped_early,
            "model_config": mcfg,
            "train_config": tcfg,
            "n_params": n_params,
            "vocab_size": len(tok),
            "tokens_seen": {"source": tokens_src, "target": tokens_tgt, "total": tokens_src + tokens_tgt},
            "time_s": {"train_loop": round(t_train, 2), "tokenizer": round(t_tok, 2), "data": round(t_data, 2),
                       "eval_before": round(t_eval, 2), "eval_after_and_reconstructions": round(t_post, 2),
                       "total": round(time.perf_counter() - t_start, 2),
                       "mean_step": round(float(np.mean(step_times)), 4) if step_times else None},
            "eval_loss_before": round(loss_before, 4),
            "eval_loss_after": round(loss_after, 4),
            "eval_before": eval_before,
            "eval_after": eval_after,
            "n_eval_examples": {k: len(v) for k, v in eval_examples.items()},
            "reconstructions": recon,
            "corpus": {
                "digest": corpus["digest"],
                "demo_sentences": len(corpus["demo"]),
                "demo_chars": demo_chars,
                "demo_tokens": sampler.demo_tokens,
                "english": corpus["info"],
                "english_tokens": sampler.english_tokens,
                "english_train_chunks": len(sampler.train_chunks),
                "english_heldout_chunks": len(sampler.eval_chunks),
                "demo_repeat_in_bpe_training": repeat,
            },
            "loss_curve": loop.curve,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__,
                         "tokenizers": __import__("tokenizers").__version__},
            "threads": torch.get_num_threads(),
        }
        with open(tmp / "pretrain_log.json", "w", encoding="utf-8") as fh:
            json.dump(log, fh, indent=1, ensure_ascii=False)
        (tmp / "README.md").write_text(
            f"# vlpet demo PLM\n\n{PLM_NOTE}\n\nBuilt by `vlpet.demo.pretrain.pretrain_demo_plm` "
            f"(seed {seed}, {step} steps, {t_train:.0f} s). Held-out BART denoising loss {loss_before:.3f} -> "
            f"{loss_after:.3f}. See pretrain_log.json.\n",
            encoding="utf-8",
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        torch.set_num_threads(prev_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"[demo-plm] saved to {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m vlpet.demo.pretrain [--budget-s 150] [--seed 0] [--cache-dir DIR] [--max-steps N]``"""
    import argparse

    ap = argparse.ArgumentParser(description="Pretrain (or reuse) the vlpet demo's tiny BART. " + PLM_NOTE)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--budget-s", type=float, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    folder = pretrain_demo_plm(a.cache_dir, a.budget_s, a.seed, True, max_steps=a.max_steps,
                               force=a.force, num_threads=a.num_threads)
    print(folder)


if __name__ == "__main__":
    main()
