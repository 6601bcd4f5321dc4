"""The text the demo PLM is pretrained on (offline, deterministic).

Two parts:

* **demo text** (:func:`demo_sentences`): the language of the demo tasks with no image in it —
  every distinct easy-VQA *train* question (the question strings only, no answers), every caption
  the caption templates produce over all 432 fact combinations (3 shapes x 8 colours x 9
  positions x 2 sizes), and every two-image statement of the NLVR-like task. About 1,700
  distinct short sentences. Nothing here depends on which images the demo data set samples, so
  no test image leaks into pretraining.
* **general English** (:func:`english_documents`), from text that ships with Python itself:
  1. ``pydoc_data.topics`` — the Python Language Reference topics behind ``help()`` (~465 KB);
  2. docstrings of the Python standard library (module, class and function docstrings of the
     ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, sorted by path; test suites,
     ``idlelib``, ``lib2to3``, ``ensurepip`` and ``site-packages`` skipped), read with ``ast``;
  3. ``this`` (The Zen of Python).
  Each source is split into paragraphs (blank lines); a paragraph is kept when it reads as prose:
  >= 6 words, >= 90% of its characters letters/space/basic punctuation, and no code markers
  (``>>>``, ``::``, ``{``, ``}``, ``==``, ``()``-heavy lines are filtered by the character
  test). Paragraphs are split into sentences at ``. ``/``? ``/``! `` before a capital letter.
  Sources are concatenated in that order and cut at ``max_chars`` (whole paragraphs).

An optional third part, off in the demo (``scene_fraction`` 0 in :mod:`vlpet.demo.pretrain`):
**text-only scenes** (:func:`scene_documents`), a caption of a fact combination followed by easy-VQA
questions with the answers the caption's facts give — tried to give the PLM a text-level "is the
named colour the described one?" skill (docs/demo/why-not-95.md, section 3).

nltk and its corpora are not available offline; this is the broadest English prose found on the
machine. It is technical English about Python, so the model learns general English syntax and
function words from it and the demo's words from the demo text (the training mix samples each
half of the time, see :mod:`vlpet.demo.pretrain`).
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import inspect
import json
import re
import sysconfig
from pathlib import Path
from typing import Iterator

from .facts import COLORS, SHAPES, all_fact_combinations, all_statements, captions_for, question_polarity

__all__ = ["demo_sentences", "english_documents", "corpus_digest", "split_sentences", "answer_for",
           "scene_documents"]

_PROSE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:'\"-?!")
_SENT_SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
_SKIP_DIRS = ("test", "tests", "idlelib", "lib2to3", "ensurepip", "site-packages", "turtledemo")


def demo_sentences() -> list[str]:
    """The distinct demo sentences (questions, captions, statements), sorted."""
    try:
        out = set(_train_questions())
    except ImportError:  # pragma: no cover - easy-vqa is a demo dependency
        out = set()
    for f in all_fact_combinations():
        out.update(captions_for(**f))
    out.update(fam.render(p) for fam, p in all_statements())
    return sorted(out)


def _train_questions() -> list[str]:
    """easy-VQA's distinct train question strings, sorted (ImportError without easy-vqa)."""
    import easy_vqa

    texts, _answers, _ids = easy_vqa.get_train_questions()
    return sorted({t.strip() for t in texts})


def _names_only(question: str, shape: str, color: str) -> bool:
    """Every colour and shape the question names is the image's (vacuously true when it names none)."""
    words = question.lower().replace("?", " ").split()
    return all(w == color for w in words if w in COLORS) and all(w == shape for w in words if w in SHAPES)


def answer_for(question: str, shape: str, color: str) -> str:
    """easy-VQA's answer to ``question`` about an image of one ``color`` ``shape`` (the rule its
    generator follows: "what ... color" -> the colour, other "what" questions -> the shape, a yes/no
    question -> whether the named colour/shape is there, flipped by a negation)."""
    words = question.lower().replace("?", " ").split()
    if words[0] == "what":
        return color if "color" in words else shape
    return "yes" if _names_only(question, shape, color) == question_polarity(question) else "no"


def scene_documents(seed: int = 0, per_scene: int = 8, questions_per_doc: int = 4) -> list[list[str]]:
    """Text-only scenes with questions and answers (an optional part of the PLM's text, off in the demo).

    For each of the 432 fact combinations, ``per_scene`` documents: one of its captions, then
    ``questions_per_doc`` distinct easy-VQA *train* question strings drawn uniformly (so the named colour
    matches as rarely as in easy-VQA), each followed by its answer (:func:`answer_for`), e.g. "a small
    red circle near the top", "is there a blue shape? no.", "what color is the circle? red.". No image and
    no easy-VQA answer is read: the answers follow from the caption's facts. ``random.Random`` per
    document, so the list is deterministic.
    """
    import random

    questions = _train_questions()
    docs = []
    for i, f in enumerate(all_fact_combinations()):
        caps = captions_for(**f)
        for j in range(per_scene):
            rng = random.Random(f"{seed}-scene-{i}-{j}")
            doc = [rng.choice(caps)]
            while len(doc) <= questions_per_doc:
                q = rng.choice(questions)
                if q.startswith("what") and not _names_only(q, f["shape"], f["color"]):
                    continue  # "what is the blue shape?" of a red circle: easy-VQA never asks that
                if any(x.startswith(q + " ") for x in doc):
                    continue
                doc.append(f"{q} {answer_for(q, f['shape'], f['color'])}.")
            docs.append(doc)
    return docs


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(paragraph) if s.strip()]


def _is_prose(p: str) -> bool:
    words = p.split()
    if len(words) < 6 or ">>>" in p or "::" in p:
        return False
    ok = sum(c in _PROSE_CHARS for c in p)
    return ok >= 0.9 * len(p)


def _paragraphs(text: str) -> list[str]:
    text = inspect.cleandoc(text)
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        if any(ln.startswith(("*", "-", "|", "+", "=")) for ln in lines[:1]) and len(lines) > 1 and lines[1].startswith(("*", "-", "=")):
            continue  # section rules / tables
        p = " ".join(ln for ln in lines if ln)
        p = re.sub(r"\s+", " ", p).strip()
        p = re.sub(r"^(?:[*-]|\d+\.)\s+", "", p)  # a leading bullet
        if p and _is_prose(p):
            out.append(p)
    return out


def _pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover
        return
    for key in sorted(topics):
        yield from _paragraphs(topics[key])


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("test") for part in rel[:-1]) or rel[-1].startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield from _paragraphs(doc)


def _zen() -> list[str]:
    try:
        import this  # noqa: F401  (prints on first import)
    except Exception:  # pragma: no cover
        return []
    return [" ".join(codecs.decode(this.s, "rot13").splitlines()[2:])]


def english_documents(max_chars: int = 1_500_000) -> tuple[list[list[str]], dict]:
    """Prose paragraphs (each a list of sentences) from the Python distribution, capped at
    ``max_chars``; duplicates removed (first occurrence kept). Returns (documents, source info)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        zen = _zen()
    sources = [("pydoc_data.topics", _pydoc_topics), ("stdlib docstrings", _stdlib_docstrings), ("this (Zen of Python)", lambda: zen)]
    docs: list[list[str]] = []
    seen: set[str] = set()
    info: dict = {"sources": {}, "max_chars": max_chars}
    total = 0
    for name, fn in sources:
        n_par = n_chars = 0
        if total >= max_chars:
            info["sources"][name] = {"paragraphs": 0, "chars": 0}
            continue
        for p in fn():
            if total >= max_chars:
                break
            if p in seen:
                continue
            seen.add(p)
            sents = split_sentences(p)
            if not sents:
                continue
            docs.append(sents)
            n_par += 1
            n_chars += len(p)
            total += len(p)
        info["sources"][name] = {"paragraphs": n_par, "chars": n_chars}
    info["chars"] = total
    info["paragraphs"] = len(docs)
    return docs, info


def corpus_digest(demo: list[str], english: list[list[str]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([demo, english], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()
