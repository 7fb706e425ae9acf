"""Author-labelled documents: loading and the seed's selection filters.

Datasets
    ``demo``
        The built-in synthetic corpus (:func:`saestore.extract.corpus.demo_corpus`), five
        authors; needs no files.
    ``AuthorMix``
        ``hallisky/AuthorMix`` from the Hugging Face hub (columns ``style`` = author, ``text``),
        or, with ``dataset_path``, a local copy: one ``.parquet``, ``.json``, ``.jsonl`` or
        ``.csv`` file, or a folder of such files (one format, read in sorted name order).
    ``news``
        Local only. ``dataset_path`` is either one JSON file of records
        ``{"style", "text", "category", "text_length_words"}`` (a JSON array or JSON lines),
        filtered to ``category_name`` when given, or a folder holding one such file per
        category, named ``{category}.json`` (or ``.jsonl``), of which ``category_name`` picks
        one (required).
    a name of your own
        With ``dataset_path``: a local file or folder read as for ``AuthorMix``; the name becomes the
        run's dataset name (its folder under ``output_dir``), so it must be a safe path component.

Known names match case-insensitively and resolve to their canonical spelling
(:func:`resolve_dataset_name`), so ``authormix`` is ``AuthorMix``.

``doc_id`` is the row index in the source file (before any filtering); for a folder of several
files it counts on across them in the order read. Local files are read with
``datasets.load_dataset(..., streaming=True)``, which leaves no Arrow cache behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saestore.errors import DatasetError

__all__ = ["DATASETS", "Document", "doc_columns_of", "load_documents", "resolve_dataset_name", "select_documents"]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("demo", "AuthorMix", "news")
AUTHORMIX_HUB_ID = "hallisky/AuthorMix"
#: other spellings of the known datasets (lower case) -> canonical name
_ALIASES = {name.lower(): name for name in DATASETS} | {AUTHORMIX_HUB_ID.lower(): "AuthorMix"}
_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass(frozen=True)
class Document:
    """One document of the corpus."""

    doc_id: int
    """Row index in the source dataset."""
    author: str
    """Author (the dataset's author column, ``style`` by default)."""
    text: str
    """Document text."""
    meta: tuple[str, ...] = ()
    """The document's values of the run's doc columns (:func:`doc_columns_of`), as text ("" where the row
    has none)."""


def resolve_dataset_name(dataset_name: str, dataset_path: str | None = None) -> str:
    """The run's dataset name: a known dataset in its canonical spelling (matched case-insensitively,
    ``hallisky/AuthorMix`` included), else, with ``dataset_path``, the name as given (a dataset of your
    own). Raises :class:`DatasetError` for an unknown name without ``dataset_path``.

    >>> resolve_dataset_name("authormix"), resolve_dataset_name("mycsv", "my.csv")
    ('AuthorMix', 'mycsv')
    """
    known = _ALIASES.get(dataset_name.strip().lower())
    if known is not None:
        return known
    if dataset_path is None:
        raise DatasetError(f"unknown dataset {dataset_name!r}: choose one of {', '.join(DATASETS)}, or pass "
                           "--dataset_path FILE to name a file of your own")
    return dataset_name


def doc_columns_of(dataset_name: str, category_name: str | None, doc_columns: Sequence[str] = (),
                   dataset_path: str | None = None) -> tuple[str, ...]:
    """The source columns a run stores per document: ``doc_columns``, and ``category`` for the news
    dataset read without ``category_name`` (its documents may be of several categories).

    >>> doc_columns_of("news", None, ["source"], "news.json"), doc_columns_of("news", "weather", (), "x")
    (('source', 'category'), ())
    """
    out = tuple(doc_columns)
    if resolve_dataset_name(dataset_name, dataset_path) == "news" and category_name is None and "category" not in out:
        out += ("category",)
    return out


def load_documents(
    dataset_name: str,
    *,
    dataset_path: str | None = None,
    category_name: str | None = None,
    author_column: str = "style",
    text_column: str = "text",
    split: str = "train",
    doc_columns: Sequence[str] = (),
) -> list[Document]:
    """Load every document of a dataset (see the module docstring), in source order, with its values
    of ``doc_columns`` in ``Document.meta`` (:func:`doc_columns_of` says which a run stores).

    Rows without an author are skipped (and logged); a missing text becomes ``""`` (dropped
    later by :func:`select_documents`). Raises :class:`DatasetError` for an unknown dataset, a
    missing file or column, an unreachable hub, or a dataset without rows.
    """
    key = resolve_dataset_name(dataset_name, dataset_path)
    if key == "demo":
        from saestore.extract.corpus import demo_corpus

        if dataset_path is not None:
            raise DatasetError("the demo corpus is built in: drop --dataset_path")
        rows: Iterable[Mapping[str, Any]] = demo_corpus()
        source = "demo corpus"
    elif key == "news":
        rows, source = _read_news(dataset_path, category_name)
    elif dataset_path is not None:  # AuthorMix's local copy, or a dataset of your own
        rows, source = _read_local(Path(dataset_path).expanduser()), str(dataset_path)
    else:
        rows, source = _read_hub(AUTHORMIX_HUB_ID, split), AUTHORMIX_HUB_ID
    docs = _to_documents(rows, source, author_column, text_column, tuple(doc_columns))
    logger.info("loaded %d documents from %s", len(docs), source)
    return docs


def _read_hub(repo_id: str, split: str) -> list[Mapping[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except OSError as e:  # ConnectionError, DatasetNotFoundError, LocalEntryNotFoundError, ...
        raise DatasetError(
            f"cannot load {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); download it where the hub is "
            "reachable and pass --dataset_path FILE (parquet, json, jsonl or csv)"
        ) from e
    except ValueError as e:  # e.g. an unknown split
        raise DatasetError(f"cannot load split {split!r} of {repo_id!r}: {e}") from e
    return list(ds)


def _local_files(path: Path) -> tuple[str, list[Path]]:
    """The ``load_dataset`` builder name and the files of a local file or folder."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _FORMATS)
        if not files:
            raise DatasetError(
                f"dataset folder {str(path)!r} holds no {', '.join(sorted(_FORMATS))} files"
            )
    else:
        raise DatasetError(f"dataset path {str(path)!r} does not exist")
    formats = {_FORMATS.get(p.suffix.lower()) for p in files}
    if None in formats:
        raise DatasetError(
            f"cannot read {str(files[0])!r}: use a {', '.join(sorted(_FORMATS))} file"
        )
    if len(formats) > 1:
        raise DatasetError(f"dataset folder {str(path)!r} mixes formats: {', '.join(sorted(formats))}")
    return formats.pop(), files


def _read_local(path: Path) -> list[Mapping[str, Any]]:
    import datasets
    from datasets.exceptions import DatasetsError

    builder, files = _local_files(path)
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:
        logger.warning("skipping empty files: %s", ", ".join(map(str, empty)))
        files = [f for f in files if f not in empty]
        if not files:
            return []
    try:
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=True
        )
        return list(ds)
    # Malformed files surface as these (pyarrow's ArrowInvalid is a ValueError).
    except (OSError, ValueError, TypeError, KeyError, StopIteration, DatasetsError) as e:
        hint = ""
        if isinstance(e, UnicodeDecodeError) or "UTF-8" in str(e):
            hint = "; the file is not UTF-8: re-encode it (e.g. iconv -f latin1 -t utf-8)"
        raise DatasetError(f"cannot read {str(path)!r} as {builder}: {type(e).__name__}: {e}{hint}") from e


def _read_news(
    dataset_path: str | None, category_name: str | None
) -> tuple[list[Mapping[str, Any]], str]:
    if dataset_path is None:
        raise DatasetError(
            "the news dataset has no hub copy: pass --dataset_path (a JSON file of records, or a "
            "folder of {category}.json files)"
        )
    path = Path(dataset_path).expanduser()
    if path.is_dir():
        by_category = {
            p.stem: p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".json", ".jsonl")
        }
        if category_name is None or category_name not in by_category:
            what = "pass --category_name" if category_name is None else f"no category {category_name!r}"
            raise DatasetError(
                f"{what}; categories in {str(path)!r}: {', '.join(sorted(by_category)) or 'none'}"
            )
        file = by_category[category_name]
        return _read_local(file), str(file)
    rows = _read_local(path)
    if category_name is None:
        return rows, str(path)
    if rows and "category" not in rows[0]:
        raise DatasetError(
            f"{str(path)!r} has no column 'category' to select {category_name!r} by; columns "
            f"found: {', '.join(rows[0])}"
        )
    kept = [
        {**row, "__doc_id": i} for i, row in enumerate(rows) if row.get("category") == category_name
    ]
    if not kept:
        found = sorted({str(r.get("category")) for r in rows})
        raise DatasetError(
            f"{str(path)!r} has no documents of category {category_name!r}; categories: "
            f"{', '.join(found)}"
        )
    return kept, f"{path} (category {category_name})"


def _to_documents(
    rows: Iterable[Mapping[str, Any]], source: str, author_column: str, text_column: str,
    doc_columns: tuple[str, ...] = (),
) -> list[Document]:
    docs: list[Document] = []
    n_no_author = 0
    first = True
    for i, row in enumerate(rows):
        if first:
            for wanted, flags in (((author_column, text_column), "--author_column / --text_column"),
                                  (doc_columns, "--doc_columns")):
                missing = [c for c in wanted if c not in row]
                if missing:
                    raise DatasetError(
                        f"{source} has no column {', '.join(repr(c) for c in missing)}; columns "
                        f"found: {', '.join(k for k in row if k != '__doc_id')} (choose with {flags})"
                    )
            first = False
        author = row.get(author_column)
        if author is None or str(author).strip() == "":
            n_no_author += 1
            continue
        text = row.get(text_column)
        doc_id = int(row.get("__doc_id", i))
        meta = tuple("" if row.get(c) is None else str(row.get(c)) for c in doc_columns)
        docs.append(Document(doc_id=doc_id, author=str(author), text="" if text is None else str(text), meta=meta))
    if first:
        raise DatasetError(f"{source} has no rows")
    if n_no_author:
        logger.warning("skipped %d rows of %s without an author", n_no_author, source)
    return docs


def select_documents(
    docs: Sequence[Document],
    *,
    n_docs: int | None,
    n_docs_per_author: int | None,
    min_length_doc: int,
    exclude_authors: Sequence[str] = (),
    min_docs_per_author: int = 1,
) -> dict[str, list[Document]]:
    """Apply the seed's filters; return ``author -> documents``, authors sorted.

    In order: drop empty / whitespace-only texts and texts shorter than ``min_length_doc``
    words (``str.split``); drop ``exclude_authors``; keep the first ``n_docs_per_author`` of
    each author in source order; drop authors left with fewer than ``min_docs_per_author``;
    cap the total at ``n_docs`` by dealing documents round-robin over the sorted authors (each
    author's first, then each author's second, …); drop authors the cap left below
    ``min_docs_per_author``. Every dropped author is logged with the reason; a cap that asks for more
    documents than there are is said in one warning (per cap, not per author). Raises
    :class:`DatasetError` when nothing is left.
    """
    for name, value in (("n_docs", n_docs), ("n_docs_per_author", n_docs_per_author)):
        if value is not None and value < 1:
            raise DatasetError(f"{name} must be at least 1 (or unset), got {value}")
    if min_length_doc < 0 or min_docs_per_author < 1:
        raise DatasetError(
            f"min_length_doc must be >= 0 and min_docs_per_author >= 1, got {min_length_doc} and "
            f"{min_docs_per_author}"
        )
    excluded = set(exclude_authors)
    n_empty = n_short = 0
    by_author: dict[str, list[Document]] = {}
    for doc in docs:
        by_author.setdefault(doc.author, [])
        if not doc.text.strip():
            n_empty += 1
        elif len(doc.text.split()) < min_length_doc:
            n_short += 1
        else:
            by_author[doc.author].append(doc)
    unknown = excluded - set(by_author)
    if unknown:
        logger.warning("excluded authors not in the dataset: %s", ", ".join(sorted(unknown)))
    if n_empty or n_short:
        logger.info(
            "dropped %d empty documents and %d shorter than %d words", n_empty, n_short, min_length_doc
        )
    if n_docs_per_author is not None:
        short = {a: len(ds) for a, ds in by_author.items() if a not in excluded and len(ds) < n_docs_per_author}
        if short:
            lo, hi = min(short.values()), max(short.values())
            logger.warning(
                "n_docs_per_author=%d: %d of %d authors have fewer usable documents (%s); they keep all they have",
                n_docs_per_author, len(short), len(set(by_author) - excluded), f"{lo}" if lo == hi else f"{lo} to {hi}",
            )
    selected: dict[str, list[Document]] = {}
    for author in sorted(by_author):
        kept = by_author[author]
        if author in excluded:
            logger.info("dropped author %r: excluded", author)
            continue
        if n_docs_per_author is not None:
            kept = kept[:n_docs_per_author]
        if len(kept) < min_docs_per_author:
            logger.warning(
                "dropped author %r: %d usable documents (fewer than min_docs_per_author=%d; "
                "min_length_doc=%d)", author, len(kept), min_docs_per_author, min_length_doc,
            )
            continue
        selected[author] = kept
    if n_docs is not None:
        available = sum(len(ds) for ds in selected.values())
        if available < n_docs:
            logger.warning("n_docs=%d: only %d usable documents are selected; all are kept", n_docs, available)
        selected = _deal(selected, n_docs)
        for author in [a for a, ds in selected.items() if len(ds) < min_docs_per_author]:
            logger.warning(
                "dropped author %r: n_docs=%d left it %d documents (fewer than "
                "min_docs_per_author=%d)", author, n_docs, len(selected[author]), min_docs_per_author,
            )
            del selected[author]
    if not selected:
        raise DatasetError(
            f"no documents left after filtering: {len(docs)} read, {n_empty} empty, {n_short} "
            f"shorter than {min_length_doc} words, {len(excluded & set(by_author))} authors "
            f"excluded, none with at least {min_docs_per_author} documents"
        )
    return selected


def _deal(by_author: dict[str, list[Document]], n_docs: int) -> dict[str, list[Document]]:
    """Keep ``n_docs`` documents in all, taken round-robin over the (sorted) authors."""
    taken = {a: 0 for a in by_author}
    remaining = n_docs
    rank = 0
    while remaining > 0:
        progressed = False
        for author, ds in by_author.items():
            if remaining == 0:
                break
            if rank < len(ds):
                taken[author] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
        rank += 1
    return {a: ds[: taken[a]] for a, ds in by_author.items()}
