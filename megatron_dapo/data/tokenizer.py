"""Demo tokenizer (tiny byte-level BPE with a ChatML template) and tokenizer loading.

Why a purpose-built tokenizer: the CPU demo trains a *tiny random-initialised* model with DAPO.  Such a
model emits an almost uniform distribution over its vocabulary, and RL can only make progress when some
sampled responses are already rewarded (DAPO's dynamic sampling drops groups whose rewards are all equal,
arXiv 2503.14476 Sec. 3.2).  With Qwen2.5's 151k-entry vocabulary a uniform sampler essentially never
writes ``Answer: 7``.  The demo tokenizer fixes this honestly, through the vocabulary alone:

* the BPE is trained on the demo prompts *and* on example response lines (``"Answer: 7\\n"``), with the
  response lines up-weighted (``answer_weight`` copies per row) so that their merges are learned;
* the ByteLevel pre-tokenizer runs with ``use_regex=False`` so merges may span spaces and a whole
  answer line ``Answer: 7\\n`` becomes one token;
* the initial alphabet is restricted to the characters of the training texts (about 45 instead of
  256 bytes) and the vocabulary is small (default 150 entries).

Measured with :func:`uniform_policy_accuracy` (uniform sampling over the vocabulary, up to 32 response
tokens, stop at ``<|im_end|>``/``<|endoftext|>``): about 6 % of responses are correct, both by the
"leading integer of the last ``Answer:`` line" rule and by the exact-line rule, because answer tokens end
with a newline.  The tokenizer is saved as a Hugging Face ``PreTrainedTokenizerFast`` directory
(``tokenizer.json`` + ``tokenizer_config.json``) with a ChatML chat template in the style of Qwen2.5
(``<|im_start|>role\\n...<|im_end|>\\n``; generation prompt ``<|im_start|>assistant\\n``; unlike Qwen2.5
no default system message is inserted, to keep prompts short).

Limitation: characters outside the trained alphabet have no token and are dropped by ``encode`` (there
is no byte fallback); :func:`train_demo_tokenizer` takes ``extra_characters`` for text beyond the demo.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

#: ChatML template in the style of Qwen2.5 (without tool support and without a default system prompt).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: Role headers the chat template emits; always part of the BPE training text.
_ROLE_HEADERS = ("system\n", "user\n", "assistant\n")

_ANSWER_LINE = re.compile(r"answer\s*:([^\n]*)", re.IGNORECASE)
_LEADING_INT = re.compile(r"\s*([-+]?\d+)")

REQUIRED_TOKENIZER_FILES = ("tokenizer_config.json",)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def last_answer_integer(text: str) -> str | None:
    """Leading integer of the last ``Answer:`` line of ``text`` (case-insensitive), else ``None``.

    ``"...\\nAnswer: 7 apples"`` → ``"7"``; ``"Answer: $x$"`` → ``None``.  A leading ``+`` is dropped.
    This is the prediction rule of the DAPO-Math instruction ("The last line of your response should be
    of the form Answer: $Answer").
    """
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    m = _LEADING_INT.match(matches[-1])
    if m is None:
        return None
    return m.group(1).lstrip("+")


def demo_tokenizer_corpus(rows: Sequence[dict], answer_weight: int = 16) -> list[str]:
    """Texts the demo BPE is trained on.

    For every row: ``"user\\n" + <prompt content>`` (each message as the chat template lays it out,
    without the special tokens, which are never merged) and ``answer_weight`` copies of the example
    response line ``"Answer: <ground_truth>\\n"``; plus the role headers once.
    Raises ``ValueError`` for ``answer_weight < 0``.
    """
    if answer_weight < 0:
        raise ValueError(f"answer_weight must be >= 0, got {answer_weight}")
    texts: list[str] = list(_ROLE_HEADERS)
    for row in rows:
        for msg in row["prompt"]:
            texts.append(f"{msg['role']}\n{msg['content']}")
        answer = f"Answer: {row['reward_model']['ground_truth']}\n"
        texts.extend([answer] * answer_weight)
    return texts


def train_demo_tokenizer(
    texts_or_rows: Iterable[str] | Sequence[dict],
    out_dir: str | Path,
    vocab_size: int = 150,
    *,
    answer_weight: int = 16,
    extra_characters: str = "0123456789\n ",
):
    """Train the demo byte-level BPE and save it as a Hugging Face tokenizer directory.

    Args:
        texts_or_rows: either demo rows (verl schema dicts; the corpus is built with
            :func:`demo_tokenizer_corpus`) or ready-made training strings.
        out_dir: output directory (created); receives ``tokenizer.json`` and ``tokenizer_config.json``.
        vocab_size: total vocabulary size including the 3 special tokens (``<|endoftext|>`` = id 0,
            pad; ``<|im_start|>`` = 1; ``<|im_end|>`` = 2, eos).  Must exceed special tokens + alphabet.
        answer_weight: copies of ``"Answer: <gt>\\n"`` per row (only used with rows).
        extra_characters: characters always added to the alphabet besides those in the texts.

    Returns:
        the saved tokenizer re-loaded with :func:`load_tokenizer` (a ``PreTrainedTokenizerFast``;
        in transformers 5.x the ``TokenizersBackend`` class it aliases).

    Raises:
        ValueError: empty corpus, or ``vocab_size`` too small for the special tokens + alphabet.

    Built with the ``tokenizers`` API (``models.BPE``, ``trainers.BpeTrainer``,
    ``pre_tokenizers.ByteLevel(use_regex=False)``, ``decoders.ByteLevel``).
    """
    # heavy: tokenizers, only loaded where a model or tokenizer is
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    items = list(texts_or_rows)
    if not items:
        raise ValueError("train_demo_tokenizer: no training texts/rows given")
    if isinstance(items[0], dict):
        texts = demo_tokenizer_corpus(items, answer_weight=answer_weight)
    else:
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"train_demo_tokenizer: item {bad[0]} is {type(items[bad[0]]).__name__}, "
                             "expected str (or pass a list of row dicts)")
        texts = list(_ROLE_HEADERS) + items

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    chars = set(extra_characters)
    for t in texts:
        chars.update(t)
    # ByteLevel maps each UTF-8 byte to a printable unicode character; the alphabet is those characters.
    alphabet = sorted({piece for ch in chars for piece in byte_level.pre_tokenize_str(ch)[0][0]})
    min_vocab = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size <= min_vocab:
        raise ValueError(f"vocab_size={vocab_size} too small: {len(SPECIAL_TOKENS)} special tokens + "
                         f"{len(alphabet)} alphabet characters need more than {min_vocab}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    # Written by hand (instead of save_pretrained) so the directory loads in transformers 4.x as well as
    # 5.x: class name PreTrainedTokenizerFast and the chat template inline, as in Qwen2.5's config.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path):
    """Load a Hugging Face tokenizer directory with ``transformers.AutoTokenizer``.

    Raises:
        FileNotFoundError: ``path`` is missing, not a directory, or lacks ``tokenizer_config.json`` or
            a vocabulary file (``tokenizer.json`` / ``vocab.json`` / ``tokenizer.model``); the message
            lists the files that are there.
    """
    from transformers import AutoTokenizer  # heavy: transformers, only loaded where a model or tokenizer is

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {p}")
    present = sorted(x.name for x in p.iterdir())
    missing = [f for f in REQUIRED_TOKENIZER_FILES if not (p / f).is_file()]
    if not any((p / f).is_file() for f in TOKENIZER_VOCAB_FILES):
        missing.append(" or ".join(TOKENIZER_VOCAB_FILES))
    if missing:
        raise FileNotFoundError(f"{p} is not a tokenizer directory: missing {', '.join(missing)} "
                                f"(found: {', '.join(present) or 'nothing'})")
    return AutoTokenizer.from_pretrained(str(p))


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a response: the tokenizer's eos plus ``<|im_end|>`` / ``<|endoftext|>`` when
    the vocabulary has them (Qwen2.5 chat ends turns with ``<|im_end|>``; its eos is ``<|endoftext|>``).
    Returns a sorted list without duplicates.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for t in (IM_END, PAD_TOKEN):
        if t in vocab:
            ids.add(int(vocab[t]))
    return sorted(ids)


def uniform_policy_accuracy(
    tokenizer,
    rows: Sequence[dict],
    *,
    num_samples: int = 2000,
    max_response_tokens: int = 32,
    seed: int = 0,
) -> dict:
    """Accuracy of a policy that samples every response token uniformly from the vocabulary.

    This is what a tiny random-initialised model does at temperature 1 (its logits are nearly equal).
    Each sample takes row ``k % len(rows)``, draws up to ``max_response_tokens`` ids uniformly from
    ``range(len(tokenizer))``, stops after a stop token (:func:`stop_token_ids`), decodes with
    ``skip_special_tokens=True`` and scores the text against ``reward_model.ground_truth``.

    Returns a dict with ``lenient`` (fraction whose :func:`last_answer_integer` equals the ground truth),
    ``exact_line`` (fraction whose last ``Answer:`` line, stripped, equals the ground truth exactly),
    ``has_answer`` (fraction with any ``Answer:`` line) and ``num_samples``.
    Raises ``ValueError`` for empty ``rows`` or non-positive counts.
    """
    if not rows:
        raise ValueError("uniform_policy_accuracy: rows is empty")
    if num_samples <= 0 or max_response_tokens <= 0:
        raise ValueError("num_samples and max_response_tokens must be positive")
    rng = random.Random(seed)
    vocab_n = len(tokenizer)
    stops = set(stop_token_ids(tokenizer))
    lenient = exact = has_answer = 0
    for k in range(num_samples):
        gt = str(rows[k % len(rows)]["reward_model"]["ground_truth"]).strip()
        ids: list[int] = []
        for _ in range(max_response_tokens):
            t = rng.randrange(vocab_n)
            ids.append(t)
            if t in stops:
                break
        text = tokenizer.decode(ids, skip_special_tokens=True)
        lines = _ANSWER_LINE.findall(text)
        if lines:
            has_answer += 1
            exact += int(lines[-1].strip() == gt)
        lenient += int(last_answer_integer(text) == gt)
    return {
        "lenient": lenient / num_samples,
        "exact_line": exact / num_samples,
        "has_answer": has_answer / num_samples,
        "num_samples": num_samples,
    }
