"""Answer extraction and number normalisation for rule-based math rewards.

Everything here is pure string processing in linear time: no ``eval``, no ``sympify``, no ``int()``
on model text (so Python's ``int_max_str_digits`` limit cannot be hit), and no regular expression
with nested quantifiers over unbounded text. Search for the answer marker starts in a bounded tail
of the response, which keeps the common case (answer on the last line of a ~64 KB response) at a
few microseconds.

The answer format follows the DAPO recipe (arXiv 2503.14476, Sec. 4 / the DAPO-Math-17k prompt:
"The last line of your response should be of the form Answer: $Answer").
"""
from __future__ import annotations

import re

__all__ = [
    "TAIL_CHARS",
    "find_answer_line",
    "find_last_boxed",
    "find_gsm8k_marker",
    "clean_answer",
    "normalize_integer",
    "normalize_number",
    "gsm8k_reference",
]

#: Size (characters) of the response tail searched first for the answer marker; the whole text is
#: searched only when the tail holds no marker.
TAIL_CHARS = 4096

#: ``answer`` then up to 8 spaces / ``*`` / ``_`` (markdown bold or italics) then a colon
#: (ASCII or full-width). Applied to lower-cased text. Bounded repetition: linear time.
_MARKER_RE = re.compile(r"answer[ \t*_]{0,8}[:\uff1a]")
_NONSPACE_RE = re.compile(r"\S")
_BRACE_RE = re.compile(r"[{}]")
_TOKEN_RE = re.compile(r"[^\s$]*")
_DIGIT_RE = re.compile(r"[0-9]")
# A leading number: sign, digits with optional comma thousands groups, optional decimal part.
# The first alternative requires at least one ",ddd" group, so on a plain digit run it fails after
# at most three steps and the second alternative (\d+) runs once: linear in the length.
_NUMBER_RE = re.compile(r"([+-]?)[ \t]*(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d*))?")
# Unit markup after a number: degree signs, percent, \text{..}-style unit words, LaTeX spaces,
# exponents on unit words ("cm^2", "\text{ m}^{3}") and markdown bold. No nested quantifiers.
_UNIT_MARKUP_RE = re.compile(
    r"\^\{?\s*\\circ\s*\}?|\\circ|\\degree|\\%|\\(?:text|mathrm|textrm|mbox)\{[^{}\\]*\}"
    r"|\\[,;:! ]|\\q?quad|\*\*|(?<=[A-Za-z}])\^\{?[23]\}?")
_MATH_CHAR_RE = re.compile(r"[-+*/=^_<>\\\[\]{}|&~#@]")
_ALPHA_RUN_RE = re.compile(r"[^\W\d_]+")
_LEAD_PHRASE_RE = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s+is\s*[:=]?\s*", re.IGNORECASE)
# Wrappers unwrapped when they enclose the whole value.
_WRAPPERS = ("\\boxed{", "\\fbox{", "\\text{", "\\textbf{", "\\mathbf{", "\\mathrm{", "\\textrm{",
             "\\mbox{", "\\displaystyle{", "{")
_DELIMS = (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$"))
# C0/C1 control characters (except tab/newline) and the zero-width characters models emit.
# Control characters become spaces (so "3<NUL>4" stays two tokens); zero-width ones are deleted.
_CONTROL_DELETE = {**{c: " " for c in list(range(0, 9)) + list(range(11, 32)) + list(range(127, 160))},
                   **{c: None for c in (0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF)}}
_UNICODE_MAP = {0x2212: "-", 0x2013: "-", 0xFF0B: "+", 0x00A0: " ", 0x202F: " ", 0x2009: " "}
_MAX_BRACE_STEPS = 20_000
_MAX_BRACE_DEPTH = 64
_MAX_CLEAN_ROUNDS = 8


def _last_marker_end(low: str) -> int:
    """Index just past the colon of the last answer marker in lower-cased ``low``, or -1.

    Anchors on the literal with ``rfind`` and confirms with the bounded regex; after 64 misses
    (text full of the word "answer") it falls back to one linear ``finditer`` pass."""
    stop = len(low)
    for _ in range(64):
        i = low.rfind("answer", 0, stop)
        if i < 0:
            return -1
        m = _MARKER_RE.match(low, i)
        if m is not None:
            return m.end()
        stop = i + 5  # the next rfind must find an occurrence starting before i
    last = -1
    for m in _MARKER_RE.finditer(low, 0, stop):
        last = m.end()
    return last


def find_answer_line(text: str) -> str | None:
    """Return the value written after the LAST ``Answer:`` marker of ``text``.

    The marker is ``answer`` (case-insensitive), optionally followed by markdown ``*``/``_`` and
    spaces, then ``:``; so ``Answer:``, ``Final answer:``, ``**Answer:**`` all count. The value is the
    rest of that line; when that rest is blank the next non-blank line is used (this matches the
    verl ``math_dapo`` reference regex ``Answer\\s*:\\s*([^\\n]+)``).

    Args:
        text: the model response (any length; only a bounded tail is lower-cased unless the tail
            holds no marker).

    Returns:
        ``None`` when there is no marker; ``""`` when the marker is followed only by whitespace;
        otherwise the stripped value line (may still contain ``$``, ``\\boxed{}``, bold, ...).
    """
    n = len(text)
    start = n - TAIL_CHARS if n > TAIL_CHARS else 0
    pos = _last_marker_end(text[start:].lower())
    if pos >= 0:
        pos += start
    elif start > 0:
        pos = _last_marker_end(text.lower())
    if pos < 0:
        return None
    m = _NONSPACE_RE.search(text, pos)
    if m is None:
        return ""
    q = m.start()
    e = text.find("\n", q)
    if e < 0:
        e = n
    return text[q:e].strip()


def _match_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``open_idx``, or -1 (unbalanced / too deep / too
    many braces). Jumps between brace characters, so long brace-free content costs nothing."""
    depth = 0
    steps = 0
    for m in _BRACE_RE.finditer(text, open_idx):
        steps += 1
        if steps > _MAX_BRACE_STEPS:
            return -1
        if m.group() == "{":
            depth += 1
            if depth > _MAX_BRACE_DEPTH:
                return -1
        else:
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _boxed_content_at(text: str, i: int, cmd_len: int) -> str | None:
    j = i + cmd_len
    m = _NONSPACE_RE.search(text, j)
    if m is None:
        return None
    k = m.start()
    if text[k] == "{":
        close = _match_brace(text, k)
        if close < 0:
            return None
        return text[k + 1:close].strip()
    if k == j:  # "\boxedfoo" is another command, not "\boxed foo"
        return None
    # "\boxed 34": the token up to the next whitespace or "$"
    return _TOKEN_RE.match(text, k).group()


def find_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}`` / ``\\boxed 34``) in ``text``.

    Brace matching is bounded (at most 20,000 brace characters, nesting depth 64); beyond that the
    box is treated as absent. Returns ``None`` when there is no (well-formed) box.
    """
    n = len(text)
    for start in ((n - TAIL_CHARS, 0) if n > TAIL_CHARS else (0,)):
        i = max(text.rfind("\\boxed", start), text.rfind("\\fbox", start))
        if i >= 0:
            cmd_len = 6 if text.startswith("\\boxed", i) else 5
            return _boxed_content_at(text, i, cmd_len)
    return None


def find_gsm8k_marker(text: str) -> str | None:
    """Value after the last ``####`` of ``text`` (GSM8K reference format), rest of that line;
    ``None`` when absent, ``""`` when blank."""
    i = text.rfind("####")
    if i < 0:
        return None
    e = text.find("\n", i + 4)
    return text[i + 4:(e if e >= 0 else len(text))].strip()


def _unwrap_once(s: str) -> str:
    s = s.strip()
    # surrounding bold/italics/quotes and a trailing full stop
    s = s.strip("*_`\"'")
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    for lo, hi in _DELIMS:
        if s.startswith(lo):
            s = s[len(lo):]
            if s.endswith(hi):
                s = s[:-len(hi)]
            return s
        if s.endswith(hi) and lo not in s:
            return s[:-len(hi)]
    for w in _WRAPPERS:
        if s.startswith(w) and s.endswith("}"):
            close = _match_brace(s, len(w) - 1)
            if close == len(s) - 1:
                return s[len(w):-1]
    return s


def clean_answer(value: str) -> str:
    """Strip presentation from an extracted answer string.

    Turns control characters into spaces, deletes zero-width characters and ``\\$`` (currency),
    maps Unicode minus/plus/spaces to ASCII, takes the content of the last ``\\boxed{}`` when one
    is present, and repeatedly unwraps surrounding
    ``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``, ``**bold**``, ``\\text{}``/``\\textbf{}``/
    ``\\mathrm{}``/``\\boxed{}``/``{}`` and a trailing period. Linear time.
    """
    s = value.translate(_CONTROL_DELETE)
    if not s.isascii():
        s = s.translate(_UNICODE_MAP)
    if "\\$" in s:  # an escaped dollar is a currency sign
        s = s.replace("\\$", "")
    if "\\boxed" in s or "\\fbox" in s:
        inner = find_last_boxed(s)
        if inner is not None:
            s = inner
    for _ in range(_MAX_CLEAN_ROUNDS):
        t = _unwrap_once(s)
        if t == s:
            break
        s = t
    return s.strip()


def _tail_is_ignorable(rest: str) -> bool:
    """Whether the text after a number (units, a trailing sentence) leaves the number unchanged.

    Accepted: nothing; a sentence end (``.``/``!``/``?``/``;`` then a space) followed by anything;
    or words and prose punctuation without digits or maths, after dropping unit markup
    (``^\\circ``, ``\\degree``, ``\\%``, ``\\text{..}``, ``\\mathrm{..}``, ``\\,``, ``cm^2``,
    ``**``): ``degrees``, ``°``, ``%``, ``cm``, ``, which is the answer``. Rejected: digits (``3 4``,
    ``34 or 35``, ``34^2``), operators and LaTeX (``34 + x``, ``34/x``, ``34\\pi``), and a single
    letter glued to the number (``34x``, ``3i``).
    """
    if not rest:
        return True
    r = rest.lstrip()
    if not r:
        return True
    if r[0] in ".!?;" and (len(r) == 1 or r[1].isspace()):
        return True
    if not rest[0].isspace():  # glued to the number: "34cm" is a unit, "34x" / "3i" is not
        m = _ALPHA_RUN_RE.match(r)
        if m is not None and m.end() == 1:
            return False
    if "\\" in r or "^" in r or "*" in r:
        r = _UNIT_MARKUP_RE.sub(" ", r)
    return _DIGIT_RE.search(r) is None and _MATH_CHAR_RE.search(r) is None


def _split_number(s: str, allow_fraction: bool) -> tuple[str, str, str] | None:
    """Parse a leading number of ``s`` into (sign, integer digits, fraction digits) or None."""
    s = s.replace("{,}", ",").replace("\\,", ",").replace("\\!", "")
    m = _NUMBER_RE.match(s)
    if m is None:
        return None
    sign, digits, frac = m.group(1), m.group(2), m.group(3) or ""
    rest = s[m.end():]
    if frac and frac.strip("0") and not allow_fraction:
        return None
    if "," in digits:
        digits = digits.replace(",", "")
    if rest and not _tail_is_ignorable(rest):
        return None
    return sign, digits, frac


def _candidates(s: str):
    yield s
    # "x = 34", "AB=34": the value after the last "="
    eq = s.rfind("=")
    if eq >= 0:
        yield clean_answer(s[eq + 1:])
    # "The final answer is 34"
    m = _LEAD_PHRASE_RE.match(s)
    if m is not None:
        yield clean_answer(s[m.end():])


def _number(value: str, allow_fraction: bool) -> str | None:
    s = clean_answer(value)
    if not s:
        return None
    for cand in _candidates(s):
        parts = _split_number(cand, allow_fraction)
        if parts is None:
            continue
        sign, digits, frac = parts
        digits = digits.lstrip("0") or "0"
        frac = frac.rstrip("0")
        body = digits + ("." + frac if frac else "")
        if body == "0":
            return "0"
        return ("-" if sign == "-" else "") + body
    return None


def normalize_integer(value: str) -> str | None:
    """Canonical decimal string of the integer written in ``value``, or None if it is not one.

    Applies :func:`clean_answer`, then reads a leading integer: optional sign (``+`` dropped,
    Unicode minus accepted), comma thousands groups (``1,000``, ``1{,}000``, ``1\\,000``), leading
    zeros dropped (``025`` -> ``25``), an all-zero decimal part allowed (``25.0`` -> ``25``), followed
    by an ignorable tail (see :func:`_tail_is_ignorable`). ``x = 34`` and ``The answer is 34`` use the
    value after ``=`` / the phrase. ``-0`` -> ``0``. No ``int()`` is called, so numbers of any length
    (10^6 digits) are handled in linear time.

    Returns:
        e.g. ``"34"``, ``"-3"``, ``"0"``; ``None`` for non-integers (``2.5``, ``\\frac{1}{2}``, ``3 4``).
    """
    return _number(value, allow_fraction=False)


def normalize_number(value: str) -> str | None:
    """Like :func:`normalize_integer` but decimals are kept: ``18.50`` -> ``18.5``, ``0.50`` ->
    ``0.5``, ``-2.0`` -> ``-2``. Used for GSM8K answers."""
    return _number(value, allow_fraction=True)


def gsm8k_reference(ground_truth: str) -> str | None:
    """Canonical number of a GSM8K reference: the value after the last ``####`` when present
    (the dataset's full-solution ``answer`` field), else the whole string. None if not a number."""
    v = find_gsm8k_marker(ground_truth)
    return normalize_number(ground_truth if v is None else v)
