"""Caption metrics through pycocoevalcap (COCO captions, TVC, YC2C; spec §5).

Scores are reported x100 (the paper's "CIDEr 122.03" is pycocoevalcap's CIDEr-D 1.2203).

Tokenisation: with Java on the PATH, pycocoevalcap's ``PTBTokenizer`` (Stanford PTB tokenizer,
lowercased, punctuation tokens removed), as the official ``language_evaluation.CocoEvaluator``
does. Without Java, :func:`simple_tokenize` is used instead: lowercase, split the clitics
"n't 's 're 've 'll 'd 'm" off their word, keep runs of letters/digits (joined across inner
"- . , : /", so "t-shirt", "3.50", "1,000" stay one token) and drop every other character.
It agrees with PTB on ordinary captions but not on every string (e.g. PTB keeps "$" and turns
brackets into "-lrb-"/"-rrb-"), so scores computed with it are close to, not equal to, the
official ones; a warning says so.

METEOR and SPICE are Java programs. METEOR takes ~10 s to start; leave it out of ``metrics`` to
skip it. SPICE needs Stanford CoreNLP, which pycocoevalcap downloads on first use, so offline it
fails: a requested metric that cannot run (no Java, a download or a subprocess failure) is left
out of the result with a ``warnings.warn``, never an exception.

pycocoevalcap is an optional dependency, imported lazily.
"""

from __future__ import annotations

import re
import shutil
import socket
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import MetricError, MetricKeyError, MetricTypeError, MissingDependencyError

__all__ = [
    "CAPTION_METRICS",
    "DEFAULT_CAPTION_METRICS",
    "caption_scores",
    "group_references",
    "java_available",
    "ptb_tokenize",
    "simple_tokenize",
    "tokenize_captions",
    "video_caption_scores",
]

CAPTION_METRICS: tuple[str, ...] = (
    "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE",
)
DEFAULT_CAPTION_METRICS: tuple[str, ...] = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")

_INSTALL_HINT = (
    "caption metrics need pycocoevalcap: install it with `pip install 'vlpet[demo]'` "
    "(or `pip install pycocoevalcap`); its PTB tokenizer, METEOR and SPICE also need Java"
)


def _import(module: str, name: str) -> Any:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised only without the optional extra
        raise MissingDependencyError(_INSTALL_HINT) from e
    return getattr(mod, name)


def java_available() -> bool:
    """True when a ``java`` executable is on the PATH."""
    return shutil.which("java") is not None


# --------------------------------------------------------------------------------------------
# Tokenisation

# Line separators that Java or Python would treat as line breaks: the PTB tokenizer works line by
# line, so one of these inside a caption would shift every later caption.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'[^\W_]+|[^\W_]+(?:[-.,:/][^\W_]+)*")


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for the PTB tokenizer (see the module docstring)."""
    text = _CLITIC.sub(r" \1", _LINE_BREAKS.sub(" ", text).lower())
    return " ".join(_TOKEN.findall(text))


def ptb_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """Tokenise ``{key: [caption, ...]}`` with pycocoevalcap's PTBTokenizer (one Java call)."""
    PTBTokenizer = _import("pycocoevalcap.tokenizer.ptbtokenizer", "PTBTokenizer")
    keys = list(captions)
    # Integer keys and single-line captions keep the tokenizer's line alignment exact.
    payload = {
        i: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in captions[k]] for i, k in enumerate(keys)
    }
    out = PTBTokenizer().tokenize(payload)
    result: dict[Any, list[str]] = {}
    for i, k in enumerate(keys):
        toks = out.get(i, [])
        if len(toks) != len(captions[k]):
            raise RuntimeError(
                f"PTB tokenizer returned {len(toks)} lines for {len(captions[k])} captions of {k!r}"
            )
        result[k] = toks
    return result


_TOKENIZERS = ("auto", "ptb", "simple")


def tokenize_captions(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    tokenizer: str = "auto",
) -> tuple[dict[Any, list[str]], dict[Any, list[str]], str]:
    """Tokenise predictions and references into pycocoevalcap's ``res`` / ``gts`` dicts.

    Returns ``(res, gts, used)`` where ``res[id] = [tokenised prediction]``,
    ``gts[id] = [tokenised references]`` (ids of ``predictions`` only) and ``used`` is "ptb" or
    "simple". ``tokenizer="auto"`` uses PTB when Java is available, else the fallback with a
    warning; "ptb" raises if Java is missing.
    """
    if tokenizer not in _TOKENIZERS:
        raise MetricError(f"tokenizer must be one of {_TOKENIZERS}, got {tokenizer!r}")
    ids = list(predictions)
    for i in ids:
        if i not in references:
            raise MetricKeyError(f"no references for caption id {i!r}")
        refs = references[i]
        if isinstance(refs, str) or len(refs) == 0:
            raise MetricError(f"references of {i!r} must be a non-empty list of strings")
        if not isinstance(predictions[i], str):
            raise MetricTypeError(f"prediction for {i!r} must be a str, got {type(predictions[i]).__name__}")

    use = tokenizer
    if tokenizer == "auto":
        use = "ptb" if java_available() else "simple"
        if use == "simple":
            warnings.warn(
                "java not found: captions are tokenised with vlpet's pure-Python fallback instead "
                "of the PTB tokenizer, so scores can differ slightly from the official ones",
                RuntimeWarning,
                stacklevel=3,
            )
    elif tokenizer == "ptb" and not java_available():
        raise MissingDependencyError("tokenizer='ptb' needs Java (the `java` executable) on the PATH")

    if use == "ptb":
        both: dict[Any, list[str]] = {}
        for i in ids:
            both[("res", i)] = [predictions[i]]
            both[("gts", i)] = list(references[i])
        tok = ptb_tokenize(both)
        res = {i: tok[("res", i)] for i in ids}
        gts = {i: tok[("gts", i)] for i in ids}
    else:
        res = {i: [simple_tokenize(predictions[i])] for i in ids}
        gts = {i: [simple_tokenize(r) for r in references[i]] for i in ids}
    return res, gts, use


# --------------------------------------------------------------------------------------------
# Scoring


def _run_meteor(gts: dict, res: dict) -> float:
    Meteor = _import("pycocoevalcap.meteor.meteor", "Meteor")
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        proc = getattr(scorer, "meteor_p", None)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    return float(score)


def _run_spice(gts: dict, res: dict) -> float:
    Spice = _import("pycocoevalcap.spice.spice", "Spice")
    # Spice() downloads CoreNLP on first use (urllib without a timeout): bound it.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        scorer = Spice()
    finally:
        socket.setdefaulttimeout(old)
    score, _ = scorer.compute_score(gts, res)
    return float(score)


def caption_scores(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    metrics: Iterable[str] = DEFAULT_CAPTION_METRICS,
    *,
    tokenizer: str = "auto",
) -> dict[str, float]:
    """Corpus-level caption metrics (x100) of ``predictions`` (id -> caption) against
    ``references`` (id -> list of reference captions), over the ids of ``predictions``.

    ``metrics`` is any subset of :data:`CAPTION_METRICS`. BLEU-n, ROUGE-L and CIDEr (CIDEr-D, as
    in coco-caption) always run; METEOR and SPICE are skipped with a warning when they cannot run
    (see the module docstring). ``tokenizer``: "auto" | "ptb" | "simple" (see
    :func:`tokenize_captions`).
    """
    wanted = list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in CAPTION_METRICS]
    if unknown:
        raise MetricError(f"unknown caption metric(s) {unknown}; choose from {CAPTION_METRICS}")
    if not predictions:
        raise MetricError("no predictions to score")
    # Fail early with the install hint, before any tokenisation work.
    _import("pycocoevalcap.cider.cider", "Cider")

    res, gts, used = tokenize_captions(predictions, references, tokenizer)
    out: dict[str, float] = {}

    bleu_wanted = [m for m in wanted if m.startswith("BLEU-")]
    if bleu_wanted:
        Bleu = _import("pycocoevalcap.bleu.bleu", "Bleu")
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for m in bleu_wanted:
            out[m] = 100.0 * float(bleu[int(m[-1]) - 1])
    if "ROUGE-L" in wanted:
        Rouge = _import("pycocoevalcap.rouge.rouge", "Rouge")
        out["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        Cider = _import("pycocoevalcap.cider.cider", "Cider")
        out["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])

    for name, runner in (("METEOR", _run_meteor), ("SPICE", _run_spice)):
        if name not in wanted:
            continue
        if not java_available():
            warnings.warn(f"{name} skipped: it needs Java, and `java` is not on the PATH", RuntimeWarning, stacklevel=2)
            continue
        try:
            out[name] = 100.0 * runner(gts, res)
        except Exception as e:  # noqa: BLE001 - an optional metric must not crash the evaluation
            hint = " (SPICE downloads Stanford CoreNLP on first use, which fails offline)" if name == "SPICE" else ""
            warnings.warn(f"{name} skipped: {type(e).__name__}: {e}{hint}", RuntimeWarning, stacklevel=2)

    return {m: out[m] for m in wanted if m in out}


# --------------------------------------------------------------------------------------------
# Multi-reference grouping (video captioning)


def group_references(
    records: Iterable[Any],
    key_fn: Callable[[Any], Any],
    text_fn: Callable[[Any], str | Sequence[str]],
) -> dict[Any, list[str]]:
    """Group reference texts by ``key_fn(record)`` (e.g. the clip id), in first-seen order.

    ``text_fn(record)`` returns one reference or a list of them (e.g. ``[d["desc"] for d in
    rec["descs"]]`` for a TVC clip record).
    """
    grouped: dict[Any, list[str]] = {}
    for rec in records:
        texts = text_fn(rec)
        bucket = grouped.setdefault(key_fn(rec), [])
        if isinstance(texts, str):
            bucket.append(texts)
        else:
            bucket.extend(texts)
    return grouped


def video_caption_scores(
    predictions: Mapping[Any, str],
    records: Iterable[Any],
    *,
    example_id_fn: Callable[[Any], Any],
    clip_id_fn: Callable[[Any], Any],
    text_fn: Callable[[Any], str],
    metrics: Iterable[str] = ("CIDEr",),
    tokenizer: str = "auto",
) -> dict[str, dict[str, float]]:
    """Video captioning scores both ways (spec §5, TVC / YC2C).

    ``records`` are the flattened examples, one per description (as the official loader builds
    them); ``predictions`` maps ``example_id_fn(record)`` -> generated caption.

    * ``"single_ref"``: each example's prediction against its own description only, as in the
      official validation (``CocoEvaluator`` with one reference per description).
    * ``"multi_ref"``: one prediction per clip (that of the clip's first predicted example)
      against all descriptions of the clip, the usual multi-reference score.
    """
    records = list(records)
    single_refs: dict[Any, list[str]] = {}
    clip_pred: dict[Any, str] = {}
    for rec in records:
        ex = example_id_fn(rec)
        if ex in predictions:
            single_refs[ex] = [text_fn(rec)]
            clip_pred.setdefault(clip_id_fn(rec), predictions[ex])
    missing = [k for k in predictions if k not in single_refs]
    if missing:
        raise MetricKeyError(f"{len(missing)} predictions have no record, e.g. {missing[0]!r}")
    multi_refs = group_references(records, clip_id_fn, text_fn)
    metrics = tuple(metrics)
    return {
        "single_ref": caption_scores(dict(predictions), single_refs, metrics, tokenizer=tokenizer),
        "multi_ref": caption_scores(clip_pred, multi_refs, metrics, tokenizer=tokenizer),
    }
