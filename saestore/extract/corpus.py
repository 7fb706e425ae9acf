"""The embedded demo corpus: five synthetic authors with distinct vocabulary and style.

Every author draws heavily on its own list of distinctive words (:data:`DEMO_AUTHOR_VOCAB`) and
shares the same function words and common vocabulary with the others; the authors also differ
in sentence length and punctuation. The corpus is generated, not shipped, and is a pure
function of its arguments:

>>> docs = demo_corpus(n_docs_per_author=2, seed=0)
>>> sorted({d["style"] for d in docs})
['astronomer', 'chef', 'gardener', 'lawyer', 'sailor']
>>> docs == demo_corpus(n_docs_per_author=2, seed=0)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from saestore.errors import DatasetError

__all__ = ["DEMO_AUTHORS", "DEMO_AUTHOR_VOCAB", "DEMO_COMMON_WORDS", "demo_corpus"]

DEMO_AUTHOR_VOCAB: dict[str, list[str]] = {
    "sailor": [
        "anchor", "harbor", "mast", "sail", "deck", "tide", "starboard", "hull", "rope",
        "knot", "captain", "crew", "voyage", "wave", "compass", "keel", "bow", "stern",
        "gale", "rudder", "lighthouse", "seagull", "cargo", "ashore", "sailors",
    ],
    "chef": [
        "garlic", "simmer", "butter", "onion", "whisk", "oven", "sauce", "pepper", "flour",
        "skillet", "roast", "basil", "salt", "broth", "dough", "lemon", "saucepan", "recipe",
        "knead", "crispy", "tender", "chop", "stir", "cream", "spices",
    ],
    "astronomer": [
        "galaxy", "nebula", "orbit", "telescope", "comet", "planet", "stellar", "quasar",
        "photon", "eclipse", "asteroid", "gravity", "redshift", "supernova", "cosmic", "lunar",
        "solar", "spectrum", "observatory", "parallax", "pulsar", "meteor", "horizon",
        "universe", "constellation",
    ],
    "lawyer": [
        "plaintiff", "defendant", "statute", "court", "contract", "liability", "clause",
        "verdict", "appeal", "counsel", "testimony", "evidence", "jury", "judge", "motion",
        "precedent", "hereby", "pursuant", "damages", "tort", "lawsuit", "witness", "ruling",
        "jurisdiction", "affidavit",
    ],
    "gardener": [
        "tulip", "soil", "compost", "seedling", "prune", "rose", "mulch", "fern", "bloom",
        "hedge", "garden", "weeds", "roots", "petals", "shovel", "greenhouse", "orchard",
        "daisy", "moss", "sprout", "watering", "leaves", "bulbs", "trellis", "blossom",
    ],
}
"""Each demo author's distinctive words, most frequent first (Zipf-weighted in the texts)."""

DEMO_AUTHORS: tuple[str, ...] = tuple(DEMO_AUTHOR_VOCAB)

_FUNCTION_WORDS: tuple[str, ...] = (
    "the", "a", "of", "and", "to", "in", "is", "was", "it", "that", "with", "for", "on",
    "we", "they", "this", "at", "by", "from", "but", "not", "as", "be", "have", "he", "she",
    "his", "her", "our", "their", "all", "so", "if", "or", "an", "there", "when", "then",
    "very", "more", "some", "into", "over", "after", "before", "under", "again", "just",
)

_SHARED_WORDS: tuple[str, ...] = (
    "day", "time", "people", "work", "good", "new", "long", "little", "old", "great", "way",
    "make", "see", "know", "take", "year", "morning", "night", "place", "small", "large",
    "first", "last", "hand", "eye", "light", "water", "world", "life", "thing", "man",
    "woman", "house", "city", "story", "slowly", "quickly", "never", "always", "often",
    "still", "every", "another", "together", "find", "keep", "think", "feel", "want",
    "look", "come", "go", "bring", "leave", "turn", "careful", "quiet", "bright", "dark",
)

DEMO_COMMON_WORDS: tuple[str, ...] = _FUNCTION_WORDS + _SHARED_WORDS
"""Words every demo author uses."""


@dataclass(frozen=True, kw_only=True)
class _Style:
    """How one author writes."""

    words_per_sentence: tuple[int, int]
    """Inclusive range of sentence lengths in words."""
    p_distinctive: float
    """Probability that a word is drawn from the author's distinctive list."""
    end_marks: tuple[str, ...]
    """Sentence endings, drawn uniformly."""
    p_comma: float
    """Probability of a comma after a (non-final) word."""
    p_aside: float
    """Probability that a sentence carries the author's aside (numbers, semicolons, …)."""


_STYLES: dict[str, _Style] = {
    "sailor": _Style(words_per_sentence=(4, 8), p_distinctive=0.35, end_marks=("!", "!", "."),
                     p_comma=0.02, p_aside=0.2),
    "chef": _Style(words_per_sentence=(7, 13), p_distinctive=0.35, end_marks=(".",),
                   p_comma=0.15, p_aside=0.3),
    "astronomer": _Style(words_per_sentence=(12, 20), p_distinctive=0.3, end_marks=(".", "?"),
                         p_comma=0.05, p_aside=0.5),
    "lawyer": _Style(words_per_sentence=(18, 30), p_distinctive=0.3, end_marks=(".",),
                     p_comma=0.12, p_aside=0.6),
    "gardener": _Style(words_per_sentence=(8, 14), p_distinctive=0.35, end_marks=("...", "."),
                       p_comma=0.05, p_aside=0.3),
}


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return np.cumsum(w / w.sum())


_FUNCTION_CDF = _zipf_cdf(len(_FUNCTION_WORDS), 1.0)
_SHARED_CDF = _zipf_cdf(len(_SHARED_WORDS), 0.6)
_OWN_CDF = {author: _zipf_cdf(len(words), 0.8) for author, words in DEMO_AUTHOR_VOCAB.items()}


def _draw(words: Sequence[str], cdf: np.ndarray, rng: np.random.Generator) -> str:
    return words[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(words) - 1)]


def _aside(author: str, rng: np.random.Generator) -> str:
    """A short author-specific insertion that shapes punctuation and numbers."""
    if author == "astronomer":
        return f"({rng.integers(2, 999)}.{rng.integers(0, 10)} light years)"
    if author == "lawyer":
        return f"; see section {rng.integers(1, 40)}({'abcd'[rng.integers(0, 4)]});"
    if author == "chef":
        return f"{rng.integers(1, 5)} cups,"
    if author == "gardener":
        return "-"
    return "ahoy,"


def _sentence(author: str, rng: np.random.Generator, n_words: int) -> list[str]:
    style = _STYLES[author]
    words: list[str] = []
    for _ in range(n_words):
        u = rng.random()
        if u < style.p_distinctive:
            word = _draw(DEMO_AUTHOR_VOCAB[author], _OWN_CDF[author], rng)
        elif u < style.p_distinctive + 0.45:
            word = _draw(_FUNCTION_WORDS, _FUNCTION_CDF, rng)
        else:
            word = _draw(_SHARED_WORDS, _SHARED_CDF, rng)
        if words and rng.random() < style.p_comma:
            words[-1] += ","
        words.append(word)
    if len(words) > 3 and rng.random() < style.p_aside:
        at = int(rng.integers(1, len(words) - 1))
        words[at:at] = _aside(author, rng).split()
    words[0] = words[0].capitalize()
    words[-1] = words[-1].rstrip(",") + style.end_marks[rng.integers(0, len(style.end_marks))]
    return words


def _document(author: str, rng: np.random.Generator) -> str:
    style = _STYLES[author]
    n_target = int(rng.integers(40, 151))
    words: list[str] = []
    while len(words) < n_target:
        lo, hi = style.words_per_sentence
        words.extend(_sentence(author, rng, int(rng.integers(lo, hi + 1))))
    words = words[:n_target]
    if words[-1][-1] not in ".!?":
        words[-1] = words[-1].rstrip(",;") + "."
    return " ".join(words)


def demo_corpus(n_docs_per_author: int = 24, seed: int = 0) -> list[dict]:
    """Generate the demo corpus: records ``{"style", "text", "doc_id"}``.

    Documents come author by author in :data:`DEMO_AUTHORS` order; ``doc_id`` is the record's
    index in the returned list (its row in the source). Each text has 40–150 words
    (``str.split``). Deterministic for a given ``(n_docs_per_author, seed)``.
    """
    if n_docs_per_author < 0:
        raise DatasetError(f"n_docs_per_author must be >= 0, got {n_docs_per_author}")
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    for author in DEMO_AUTHORS:
        for _ in range(n_docs_per_author):
            records.append({"style": author, "text": _document(author, rng), "doc_id": len(records)})
    return records
