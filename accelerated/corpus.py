"""Evaluation text, tokenization and windows (docs/12-evaluation.md §12.1).

:func:`load_corpus` returns the evaluation text and its name: a file given by
path (or ``$KVSINK_WIKITEXT``), else the offline default text, CPython's
bundled ``pydoc_data.topics`` (the Python language reference's topic pages,
~465,000 characters of English prose, ~113,000 SmolLM2 tokens; installed with
every CPython, so no download).  :func:`tokenize_corpus` tokenizes it once
(WikiText-2 files with their rows joined by ``"\\n\\n"``, the common practice),
:func:`make_windows` cuts the token stream into non-overlapping windows, each
opened by the tokenizer's BOS token where the tokenizer adds one
(:func:`window_bos`), the way the model saw text in training.

A second English corpus, :func:`lee_corpus_text` (``--corpus lee``): the Lee
background corpus, 300 news articles (360 KB), read from inside gensim's
wheel (``gensim/test/test_data/lee_background.cor``), fetched once with
``pip download --no-deps`` into ``cache_dir()/corpora`` and checked against its
SHA-256; nothing is installed or imported from the wheel.
:func:`load_named_corpus` resolves ``wikitext`` / ``lee`` / ``default`` / a path.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = [
    "DEFAULT_CORPUS_NAME",
    "PACKAGED_TEXT_NAME",
    "default_corpus_text",
    "default_corpus_path",
    "load_corpus",
    "LEE_REQUIREMENT",
    "LEE_MEMBER",
    "LEE_SHA256",
    "LEE_NAME",
    "corpora_dir",
    "lee_corpus_text",
    "load_named_corpus",
    "is_wikitext",
    "corpus_documents",
    "tokenize_corpus",
    "window_bos",
    "window_count",
    "make_windows",
]

#: Name reported for the default evaluation text.
DEFAULT_CORPUS_NAME = "pydoc_data.topics (CPython's bundled language-reference topics)"
#: Name reported for the packaged calibration essay when it is evaluated.
PACKAGED_TEXT_NAME = "kvsink default corpus (accelerated/data/default_corpus.txt)"
_WIKITEXT_ENV = "KVSINK_WIKITEXT"


def default_corpus_text() -> str:
    """The default evaluation text: ``pydoc_data.topics.topics``' pages in sorted key order,
    separated by a blank line (the same string on every CPython of one version)."""
    from pydoc_data import topics
    return "\n\n".join(topics.topics[k].strip("\n") for k in sorted(topics.topics)) + "\n"


def default_corpus_path() -> Path:
    """Path of the packaged essay (original prose, ~2,300 words): the default *calibration*
    text (``accelerated.calibration``), held out from the default evaluation text."""
    return Path(__file__).resolve().parent / "data" / "default_corpus.txt"


def is_wikitext(name: str) -> bool:
    """Whether a corpus name (of :func:`load_corpus`) is a WikiText-2 raw file."""
    return name.startswith("wikitext-2")


def load_corpus(path=None) -> Tuple[str, str]:
    """Return ``(text, name)`` of the evaluation corpus.

    1. ``path`` if given (a WikiText-2 ``wiki.test.raw`` or any UTF-8 text file);
       a missing file raises ``FileNotFoundError`` — an explicit path is never
       silently replaced;
    2. else the file named by ``$KVSINK_WIKITEXT`` (missing: ``FileNotFoundError``);
    3. else the default text, :func:`default_corpus_text`.

    ``name`` says which was used: ``"wikitext-2 test (<path>)"`` for a file named
    ``wiki.test.raw``, :data:`PACKAGED_TEXT_NAME` for the packaged essay,
    ``"<path>"`` for another file, :data:`DEFAULT_CORPUS_NAME` for the default.
    An empty file is a ``ValueError``.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--data file {p} does not exist; pass the path of a text file "
                                    "(e.g. WikiText-2's wiki.test.raw), or omit it to use the default "
                                    "text")
        return _named(p)
    env = os.environ.get(_WIKITEXT_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${_WIKITEXT_ENV}={env} does not exist; fix or unset it")
        return _named(p)
    return default_corpus_text(), DEFAULT_CORPUS_NAME


def _named(p: Path) -> Tuple[str, str]:
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"corpus file {p} is empty")
    if p.name == "wiki.test.raw":
        return text, f"wikitext-2 test ({p})"
    if p.resolve() == default_corpus_path():
        return text, PACKAGED_TEXT_NAME
    return text, str(p)


#: The wheel that holds the Lee corpus (any platform's wheel of this version holds the same file).
LEE_REQUIREMENT = "gensim==4.4.0"
#: The corpus file inside the wheel, and its SHA-256.
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
LEE_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
#: Name reported for the Lee corpus.
LEE_NAME = "lee_background (gensim 4.4.0 test data: 300 news articles)"


def corpora_dir() -> Path:
    """Folder of downloaded corpus wheels: ``cache_dir()/corpora`` (``$KVSINK_CACHE`` or ``~/.cache/kvsink``)."""
    from .model_registry import cache_dir
    return cache_dir() / "corpora"


def lee_corpus_text(folder=None, *, download: bool = True) -> str:
    """The Lee background corpus: 300 news articles, one per line (UTF-8 text).

    Read from ``gensim-4.4.0-*.whl`` in ``folder`` (default :func:`corpora_dir`);
    with none there and ``download=True`` the wheel is fetched first with
    ``pip download --no-deps`` (``model_registry.pip_download``).
    ``FileNotFoundError`` (naming the command to run) when no wheel can be had;
    ``ValueError`` when the wheel lacks :data:`LEE_MEMBER` or the file's SHA-256
    is not :data:`LEE_SHA256`.
    """
    folder = Path(folder) if folder is not None else corpora_dir()
    wheel = _lee_wheel(folder)
    if wheel is None:
        if not download:
            raise FileNotFoundError(f"--corpus lee needs the {LEE_REQUIREMENT} wheel in {folder}: run "
                                    f"`pip download --no-deps {LEE_REQUIREMENT} -d {folder}` (or omit "
                                    "download=False to fetch it)")
        from .model_registry import pip_download
        folder.mkdir(parents=True, exist_ok=True)
        pip_download(LEE_REQUIREMENT, folder)
        wheel = _lee_wheel(folder)
        if wheel is None:
            raise FileNotFoundError(f"fetching {LEE_REQUIREMENT} left no wheel in {folder}")
    with zipfile.ZipFile(wheel) as zf:
        if LEE_MEMBER not in zf.namelist():
            raise ValueError(f"{wheel.name} holds no {LEE_MEMBER}: not the {LEE_REQUIREMENT} wheel; "
                             "delete it and retry")
        data = zf.read(LEE_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != LEE_SHA256:
        raise ValueError(f"{LEE_MEMBER} in {wheel} has sha256 {digest}, expected {LEE_SHA256}: not the "
                         f"{LEE_REQUIREMENT} wheel; delete it and retry")
    return data.decode("utf-8")


def _lee_wheel(folder: Path) -> Optional[Path]:
    dist, version = LEE_REQUIREMENT.split("==")
    found = sorted(folder.glob(f"{dist}-{version}-*.whl")) if folder.is_dir() else []
    return found[0] if found else None


def load_named_corpus(name: str, *, download: bool = True) -> Tuple[str, str, bool]:
    """``(text, name, wikitext_rows)`` of a corpus chosen by name.

    ``"wikitext"``: the file of ``$KVSINK_WIKITEXT`` (``FileNotFoundError`` when unset);
    ``"lee"``: :func:`lee_corpus_text`; ``"default"``: :func:`default_corpus_text`;
    anything else: a text file's path (:func:`load_corpus`).  ``wikitext_rows`` says whether
    :func:`tokenize_corpus` should join WikiText rows (:func:`is_wikitext`).
    """
    if name == "lee":
        return lee_corpus_text(download=download), LEE_NAME, False
    if name == "default":
        return default_corpus_text(), DEFAULT_CORPUS_NAME, False
    if name == "wikitext":
        if not os.environ.get(_WIKITEXT_ENV):
            raise FileNotFoundError(f"--corpus wikitext reads ${_WIKITEXT_ENV}: set it to WikiText-2's "
                                    "wiki.test.raw, or pass that file's path as --corpus")
        text, label = load_corpus()
    else:
        text, label = load_corpus(name)
    return text, label, is_wikitext(label)


def corpus_documents(text: str) -> List[str]:
    """Rows of a raw text file as the Hugging Face ``wikitext`` dataset gives them.

    One row per line; a non-blank line keeps its trailing ``"\\n"``, a blank
    line becomes ``""`` (the ``wikitext-2-raw-v1`` loading script).
    """
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def tokenize_corpus(text: str, tokenizer, *, wikitext_rows: bool = True) -> torch.Tensor:
    """Token ids ``(1, N)`` of the whole corpus, tokenized once, **without** special tokens.

    ``wikitext_rows=True``: the rows of :func:`corpus_documents` are joined with
    ``"\\n\\n"`` (the common practice for WikiText raw in GPTQ / KIVI / lm-eval
    style perplexity scripts); False: the text as it is.  No BOS/EOS is added
    (``add_special_tokens=False``): :func:`make_windows` opens every window with
    the BOS of :func:`window_bos` instead.
    """
    joined = "\n\n".join(corpus_documents(text)) if wikitext_rows else text
    enc = tokenizer(joined, return_tensors="pt", verbose=False, add_special_tokens=False)
    return enc["input_ids"].to(torch.long)


def window_bos(tokenizer) -> Optional[int]:
    """The token id that opens every evaluation window: the tokenizer's BOS where it adds one.

    ``tokenizer.bos_token_id`` when it is set **and** the tokenizer puts it in front of
    text by default (``tokenizer("a")["input_ids"][0] == bos_token_id``): the way the
    model saw text in training.  None otherwise — a tokenizer without a BOS, or one
    that declares a BOS token but does not add it (SmolLM2's ``<|im_start|>`` and
    Qwen2.5's ``<|endoftext|>``: docs/12-evaluation.md §12.1).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(ids) and int(ids[0]) == int(bos) else None


def window_count(n_tokens: int, seq_len: int, bos_token_id: Optional[int] = None) -> int:
    """Whole windows of ``seq_len`` tokens that ``n_tokens`` text tokens give: each window holds
    ``seq_len`` text tokens, or ``seq_len - 1`` after a BOS (``bos_token_id`` not None)."""
    return int(n_tokens) // (seq_len - (bos_token_id is not None))


def make_windows(input_ids, seq_len: int, max_windows: Optional[int] = None,
                 bos_token_id: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows ``(W, seq_len)`` of a token stream.

    ``input_ids`` is ``(N,)`` or ``(1, N)``.  Without ``bos_token_id``, window ``w``
    holds tokens ``[w * seq_len, (w + 1) * seq_len)``.  With it (a BOS, see
    :func:`window_bos`), window ``w`` is that BOS followed by text tokens
    ``[w * (seq_len - 1), (w + 1) * (seq_len - 1))``: the BOS is context, never a
    scored target, and every text token is scored once (the ``seq_len - 1``
    predictions of a window are its text tokens).  A trailing partial window is
    dropped; the first ``max_windows`` are kept (``None``: all).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one prediction needs two tokens), got {seq_len!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be None or an int >= 1, got {max_windows!r}")
    if bos_token_id is not None and (isinstance(bos_token_id, bool) or not isinstance(bos_token_id, int)
                                     or bos_token_id < 0):
        raise ValueError(f"bos_token_id must be None or a token id >= 0, got {bos_token_id!r}")
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"input_ids must have shape (N,) or (1, N), got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {ids.dtype}")
    text_len = seq_len - (bos_token_id is not None)
    n = window_count(ids.shape[0], seq_len, bos_token_id)
    if n == 0:
        raise ValueError(f"the corpus has {ids.shape[0]} tokens, fewer than seq_len={seq_len}"
                         + (" less the window's BOS" if bos_token_id is not None else "")
                         + "; use a smaller seq_len or a longer corpus")
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * text_len].reshape(n, text_len).to(torch.long)
    if bos_token_id is None:
        return windows
    return torch.cat([torch.full((n, 1), bos_token_id, dtype=torch.long), windows], dim=1)
