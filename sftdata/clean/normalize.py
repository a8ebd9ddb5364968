"""Text normalization for hashing, and the vectorized token / shingle hashing both cleaning stages share.

Normalization (:class:`Normalizer`, every step configurable, applied in this order):

1. ``unicode="NFKC"``: Unicode compatibility normalization (full-width letters and digits, ligatures, non-breaking
   and other exotic spaces become their plain forms). ``None`` skips it.
2. ``lowercase=True``: case folding with ``str.lower``.
3. ``punctuation``: ``"space"`` (``True``, the dedup default): every character that is neither a word character
   (letter, digit, ``_``) nor whitespace becomes a space, so ``"x=1,y"`` gives the tokens ``x 1 y``.
   ``"delete"`` (the decontamination default): every character that is not a letter, digit or whitespace (``_``
   included) is removed, so ``"don't"``, ``"1,000"`` and ``has_close_elements`` give ``dont``, ``1000`` and
   ``hascloseelements``: the same tokens as a copy whose punctuation was stripped. ``"keep"`` (``False``): unchanged.
4. ``whitespace=True``: runs of whitespace (spaces, tabs, newlines, line wrapping) become one space and the ends
   are stripped. Tokens are always split on whitespace; this option only decides whether exact-duplicate
   hashing sees a difference in spacing.
5. ``digits=False``: digits are **kept** by default (math data differs only in numbers); ``digits=True`` maps
   every digit to ``0``.

The text of a record is ``"role: content"`` per message joined by newlines (roles included), or the raw text.

Fast path: ASCII text (nearly all of it) is normalized with one ``bytes.translate`` table and ``bytes.split``;
other text goes through the reference :meth:`Normalizer.normalize`. Tokens, word n-gram shingles and their
64-bit hashes are then computed for a whole batch at once with numpy (a polynomial hash over the bytes of each
token via prefix sums, then the MurmurHash3 finalizer), with no Python work per token.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sftdata.record import Record

_PUNCT = re.compile(r"[^\w\s]")
_PUNCT_OR_UNDERSCORE = re.compile(r"[^\w\s]|_")
PUNCTUATION_MODES = ("space", "delete", "keep")
_DIGIT = re.compile(r"\d")
_NON_ASCII_SPACE = re.compile(r"[^\S\t\n\x0b\x0c\r ]")  # whitespace that is not ASCII whitespace
_ASCII_WS = b" \t\n\x0b\x0c\r"

U64 = np.uint64
_M64 = (1 << 64) - 1


def record_text(record: Record) -> str:
    """The text hashed for a record: ``"role: content"`` lines for a chat (roles included), else the raw text."""
    if record.messages is not None:
        return "\n".join(f"{m.role}: {m.content}" for m in record.messages)
    return record.text or ""


@dataclass(frozen=True)
class Normalizer:
    """How text is normalized before hashing; see the module docstring for the exact rules."""

    lowercase: bool = True
    punctuation: str = "space"
    whitespace: bool = True
    unicode: str | None = "NFKC"
    digits: bool = False
    _table: bytes = field(default=b"", init=False, repr=False, compare=False)
    _delete: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.unicode not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"unicode must be None, NFC, NFKC, NFD or NFKD, not {self.unicode!r}")
        if isinstance(self.punctuation, bool):
            object.__setattr__(self, "punctuation", "space" if self.punctuation else "keep")
        if self.punctuation not in PUNCTUATION_MODES:
            raise ValueError(f"punctuation must be one of {PUNCTUATION_MODES}, not {self.punctuation!r}")
        table = bytearray(range(256))
        delete = bytearray()
        for c in range(128):
            ch = chr(c)
            if self.lowercase:
                table[c] = ord(ch.lower())
            if self.punctuation == "space" and _PUNCT.match(ch):
                table[c] = 32
            if self.punctuation == "delete" and _PUNCT_OR_UNDERSCORE.match(ch) and not ch.isspace():
                delete.append(c)
            if self.digits and ch.isdigit():
                table[c] = ord("0")
            if c in (0x1C, 0x1D, 0x1E, 0x1F):  # whitespace to str.split, not to bytes.split: make it a space
                table[c] = 32
        object.__setattr__(self, "_table", bytes(table))
        object.__setattr__(self, "_delete", bytes(delete))

    @classmethod
    def from_spec(cls, spec: "Normalizer | dict[str, Any] | str | None",
                  base: "Normalizer | None" = None) -> "Normalizer":
        """Build from a Normalizer, a dict of options, ``None`` (defaults) or a string like
        ``"lowercase=0,punctuation=delete,digits=0,unicode=NFKC"`` (``punctuation`` takes ``space``, ``delete``,
        ``keep`` or a boolean). Options not given keep their value in ``base`` (default: ``Normalizer()``)."""
        base = base or cls()
        if spec is None:
            return base
        if isinstance(spec, Normalizer):
            return spec
        if isinstance(spec, str):
            options: dict[str, Any] = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                key, _, value = part.partition("=")
                key = key.strip()
                value = value.strip()
                if key == "unicode":
                    options[key] = None if value.lower() in ("", "none", "0", "false", "off") else value.upper()
                elif key == "punctuation" and value.lower() in PUNCTUATION_MODES:
                    options[key] = value.lower()
                else:
                    if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                        raise ValueError(f"bad normalization option {part!r}: expected {key}=true|false")
                    options[key] = value.lower() in ("1", "true", "yes", "on")
            spec = options
        unknown = set(spec) - {"lowercase", "punctuation", "whitespace", "unicode", "digits"}
        if unknown:
            raise ValueError(f"unknown normalization options {sorted(unknown)}; "
                             "expected lowercase, punctuation, whitespace, unicode, digits")
        return cls(**{**base.to_dict(), **spec})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_table", None)
        d.pop("_delete", None)
        return d

    # -- reference implementation (any text) -------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """The normalized text (reference implementation; :meth:`normalize_bytes` is the fast equivalent)."""
        if self.unicode:
            text = unicodedata.normalize(self.unicode, text)
        if self.lowercase:
            text = text.lower()
        if self.punctuation == "space":
            text = _PUNCT.sub(" ", text)
        elif self.punctuation == "delete":
            text = _PUNCT_OR_UNDERSCORE.sub("", text)
        if self.digits:
            text = _DIGIT.sub("0", text)
        if self.whitespace:
            return " ".join(text.split())
        return _NON_ASCII_SPACE.sub(" ", text)

    def tokens(self, text: str) -> list[str]:
        return self.normalize(text).split()

    # -- fast path ----------------------------------------------------------------------------------------------
    def normalize_bytes(self, text: str) -> bytes:
        """UTF-8 of :meth:`normalize` up to whitespace: the same tokens, but runs of whitespace may be left as they
        are (a translate-table fast path for ASCII text). Exact hashing uses the token sequence."""
        if text.isascii():
            return text.encode("ascii").translate(self._table, self._delete)
        return self.normalize(text).encode("utf-8")


# ------------------------------------------------------------------------------------------------------------------
# Vectorized hashing
#
# Token hash (64-bit): the token's UTF-8 bytes are cut into 8-byte little-endian words w_0, w_1, ... (the last one
# zero-padded); h = fmix64(w_0 ^ len * K0), then h = fmix64(h * K1 + w_c) for each further word. Tokens are the
# maximal runs of bytes > 0x20 (whitespace and ASCII control characters separate tokens). Shingle hash: the
# polynomial sum of the n token hashes (mod 2^64, base _SHINGLE_BASE) through fmix64; a document with fewer than
# n tokens has one shingle made of all its tokens.

_K0 = U64(0x9E3779B97F4A7C15)
_K1 = U64(0xBF58476D1CE4E5B9)
_SHINGLE_BASE = U64(0xC2B2AE3D27D4EB4F)
_LEN_MASK = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [_M64], dtype=U64)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection that spreads every input bit over the output)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> U64(33))
        h *= U64(0xFF51AFD7ED558CCD)
        h ^= h >> U64(33)
        h *= U64(0xC4CEB9FE1A85EC53)
        h ^= h >> U64(33)
        return h


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (the pre-mix datasketch's ``affine32`` scheme applies)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
        return h


def token_hashes(docs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the tokens of each normalized document, for a whole batch at once.

    Returns ``(hashes, offsets)``: the tokens of document ``d`` are ``hashes[offsets[d]:offsets[d + 1]]``.
    """
    n_docs = len(docs)
    if n_docs == 0:
        return np.zeros(0, dtype=U64), np.zeros(1, dtype=np.int64)
    joined = b" " + b" ".join(docs) + b" " * 16
    buf = np.frombuffer(joined, dtype=np.uint8)
    word = buf > 32
    edges = np.flatnonzero(word[1:] != word[:-1]) + 1
    starts = edges[0::2]
    lens = edges[1::2] - starts
    # every byte offset viewed as the start of an unaligned little-endian uint64
    view = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=joined, offset=0, strides=(1,))
    with np.errstate(over="ignore"):
        h = fmix64(view[starts] & _LEN_MASK[np.minimum(lens, 8)] ^ (lens.astype(U64) * _K0))
        long = np.flatnonzero(lens > 8)
        c = 1
        while len(long):
            st = starts[long] + 8 * c
            rest = lens[long] - 8 * c
            w = view[st] & _LEN_MASK[np.minimum(rest, 8)]
            h[long] = fmix64(h[long] * _K1 + w)
            long = long[rest > 8]
            c += 1
    doc_len = np.fromiter(map(len, docs), dtype=np.int64, count=n_docs)
    doc_starts = np.zeros(n_docs + 1, dtype=np.int64)
    doc_starts[0] = 1
    np.cumsum(doc_len + 1, out=doc_starts[1:])
    doc_starts[1:] += 1
    offsets = np.searchsorted(starts, doc_starts, side="left").astype(np.int64)
    return h, offsets


def shingle_hashes(tok: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the word ``n``-gram shingles of each document.

    A document with ``0 < k < n`` tokens has exactly one shingle (all its tokens); an empty document has none.
    Returns ``(hashes, offsets)`` laid out like :func:`token_hashes`.
    """
    if n < 1:
        raise ValueError("shingle size must be >= 1")
    ntok = np.diff(offsets)
    count = np.where(ntok >= n, ntok - n + 1, np.minimum(ntok, 1))
    sh_offsets = np.zeros(len(ntok) + 1, dtype=np.int64)
    np.cumsum(count, out=sh_offsets[1:])
    total = int(sh_offsets[-1])
    if total == 0:
        return np.zeros(0, dtype=U64), sh_offsets
    L = len(tok)
    padded = np.concatenate([tok, np.zeros(n, dtype=U64)])
    with np.errstate(over="ignore"):
        acc = padded[0:L].copy()
        for k in range(1, n):
            acc *= _SHINGLE_BASE
            acc += padded[k:L + k]
    # keep the grams that lie inside one document
    tok_end = np.repeat(offsets[1:], ntok)
    valid = (tok_end - np.arange(L)) >= n
    out = np.empty(total, dtype=U64)
    long_docs = ntok >= n
    long_mask = np.repeat(long_docs, count)
    out[long_mask] = acc[valid]
    short = np.flatnonzero((ntok > 0) & ~long_docs)
    if len(short):
        first = offsets[short]
        k_short = ntok[short]
        with np.errstate(over="ignore"):
            s_acc = np.zeros(len(short), dtype=U64)
            for k in range(n):
                val = np.where(k < k_short, padded[first + np.minimum(k, k_short - 1)], U64(0))
                s_acc = s_acc * _SHINGLE_BASE + val
        out[sh_offsets[short]] = s_acc
    return fmix64(out ^ U64(n)), sh_offsets


# -- slow reference versions (tests check the vectorized code against these) --------------------------------------

def reference_token_hash(token: bytes) -> int:
    def fmix(x: int) -> int:
        return int(fmix64(np.array([x & _M64], dtype=U64))[0])

    words = [int.from_bytes(token[i:i + 8].ljust(8, b"\0"), "little") for i in range(0, max(len(token), 1), 8)]
    h = fmix(words[0] ^ (len(token) * int(_K0)))
    for w in words[1:]:
        h = fmix(h * int(_K1) + w)
    return h


def reference_tokens(text: str, normalizer: Normalizer) -> list[bytes]:
    return re.split(rb"[\x00-\x20]+", normalizer.normalize(text).encode("utf-8").strip(bytes(range(33))))


def reference_shingle_set(text: str, normalizer: Normalizer, n: int) -> set[int]:
    toks = [reference_token_hash(t) for t in reference_tokens(text, normalizer) if t]
    grams = [toks[i:i + n] for i in range(len(toks) - n + 1)] if len(toks) >= n else ([toks] if toks else [])
    out = set()
    for g in grams:
        acc = 0
        for k in range(n):
            acc = (acc * int(_SHINGLE_BASE) + (g[k] if k < len(g) else 0)) & _M64
        out.add(int(fmix64(np.array([acc ^ n], dtype=U64))[0]))
    return out
