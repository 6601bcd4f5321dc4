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

from .facts import all_fact_combinations, all_statements, captions_for

__all__ = ["demo_sentences", "english_documents", "corpus_digest", "split_sentences"]

_PROSE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:'\"-?!")
_SENT_SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
_SKIP_DIRS = ("test", "tests", "idlelib", "lib2to3", "ensurepip", "site-packages", "turtledemo")


def demo_sentences() -> list[str]:
    """The distinct demo sentences (questions, captions, statements), sorted."""
    out: set[str] = set()
    try:
        import easy_vqa

        texts, _answers, _ids = easy_vqa.get_train_questions()
        out.update(t.strip() for t in texts)
    except ImportError:  # pragma: no cover - easy-vqa is a demo dependency
        pass
    for f in all_fact_combinations():
        out.update(captions_for(**f))
    out.update(fam.render(p) for fam, p in all_statements())
    return sorted(out)


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
