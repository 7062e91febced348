"""Long-context retrieval tasks for checking that sparse prefill keeps what dense attention finds.

`passkey_prompt` is RULER's passkey task (after Mohtashami & Jaggi's landmark-attention test):
one needle sentence carrying a 5-digit key, hidden at a chosen depth in a haystack of repeated
filler, then a question the model completes. It is a plain completion prompt, no chat template,
so a base model answers by continuing with the digits.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

# The haystack grows a sentence at a time, so prompt length and needle depth are fine-grained.
_SENTENCES = [s if s.endswith(".") else s + "." for s in FILLER.split(". ")]


def _render(n_sentences: int, depth: float, key: str) -> str:
    hay = [_SENTENCES[i % len(_SENTENCES)] for i in range(n_sentences)]
    at = round(depth * n_sentences)
    hay.insert(at, NEEDLE.format(key=key))
    return f"{INTRO}\n\n{' '.join(hay)}\n\n{QUESTION}"


def _count(tokenizer, text: str) -> int:
    # Counted as the engine sees it: with the special tokens (Gemma's <bos>) the tokenizer adds.
    ids = tokenizer.encode(text)
    return len(getattr(ids, "ids", ids))  # a raw `tokenizers.Tokenizer` returns an Encoding


def passkey_prompt(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """A passkey prompt of at most `n_tokens` tokens (within one filler sentence of it) and its answer.

    `depth` in [0, 1] places the needle in the haystack: 0 first, 1 last (just before the question).
    The key is 5 digits drawn from `seed`; the same arguments always give the same prompt.
    Returns (prompt, expected answer), e.g. ("There is an important ... The pass key is", "71432").
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(10000, 99999))
    base = _count(tokenizer, _render(0, depth, key))
    if n_tokens < base:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for a haystack ({base} tokens without one)")
    # Filler tokenizes almost additively: estimate the sentence count, then step to the largest fit.
    probe = 50
    per_sentence = max((_count(tokenizer, _render(probe, depth, key)) - base) / probe, 1e-3)
    n = int((n_tokens - base) / per_sentence)
    while n > 0 and _count(tokenizer, _render(n, depth, key)) > n_tokens:
        n -= 1
    while _count(tokenizer, _render(n + 1, depth, key)) <= n_tokens:
        n += 1
    return _render(n, depth, key), key


def passkey_correct(completion: str, answer: str) -> bool:
    """Whether the completion's first number is the passkey (" 71432. Remember" counts; "7143" does not)."""
    m = re.search(r"\d+", completion)
    return m is not None and m.group(0) == answer


# --- multi-key needle and variable tracking (RULER's niah_multikey and vt) -----------------

_WORDS = ("apple", "river", "candle", "marble", "violin", "harbor", "pepper", "garden", "rocket", "silver",
          "tunnel", "meadow", "lantern", "copper", "falcon", "orchid", "glacier", "walnut", "canyon", "saffron")


def _fit(tokenizer, render, n_tokens: int) -> str:
    """The longest render(n) (n units of filler: sentences, tokens) that fits in n_tokens tokens."""
    base = _count(tokenizer, render(0))
    if n_tokens < base:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for a haystack ({base} tokens without one)")
    per = max((_count(tokenizer, render(50)) - base) / 50, 1e-3)
    n = int((n_tokens - base) / per)
    while n > 0 and _count(tokenizer, render(n)) > n_tokens:
        n -= 1
    while _count(tokenizer, render(n + 1)) <= n_tokens:
        n += 1
    return render(n)


def multikey_prompt(tokenizer, n_tokens: int, index: int, seed: int, keys: int = 4) -> tuple[str, str]:
    """Several needles "The special magic number for WORD is NNNNNNN." at spread depths; the question
    asks for one of them, so the model must retrieve the right needle, not just any."""
    rng = random.Random(seed)
    words = rng.sample(_WORDS, keys)
    numbers = [str(rng.randint(1000000, 9999999)) for _ in words]
    target = rng.randrange(keys)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in words)
    question = f"What is the special magic number for {words[target]}? The special magic number for {words[target]} is"

    def render(n):
        hay = [_SENTENCES[i % len(_SENTENCES)] for i in range(n)]
        for depth, w, num in sorted(zip(depths, words, numbers), reverse=True):
            hay.insert(round(depth * n), f"The special magic number for {w} is {num}.")
        return f"{INTRO}\n\n{' '.join(hay)}\n\n{question}"

    return _fit(tokenizer, render, n_tokens), numbers[target]


def variable_tracking_prompt(tokenizer, n_tokens: int, index: int, seed: int, hops: int = 4) -> tuple[str, str]:
    """A chain VAR A = 12345, VAR B = VAR A, ... spread through the haystack; the question asks which
    variable names hold the value, and the answer is the chain's names (all must be named)."""
    rng = random.Random(seed)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops)]
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops)]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in lines)
    question = (f"Find all variables that are assigned the value {value} in the text above. "
                f"Answer: the variables assigned {value} are VAR {names[0]},")

    def render(n):
        hay = [_SENTENCES[i % len(_SENTENCES)] for i in range(n)]
        for depth, line in sorted(zip(depths, lines), reverse=True):
            hay.insert(round(depth * n), line)
        return f"{INTRO}\n\n{' '.join(hay)}\n\n{question}"

    # The first name is given in the question; the model must continue the chain.
    return _fit(tokenizer, render, n_tokens), " ".join(names[1:])


def names_correct(completion: str, answer: str) -> bool:
    return all(name in completion for name in answer.split())


@dataclass(frozen=True)
class Task:
    build: Callable[..., tuple[str, str]]  # (tokenizer, n_tokens, index, seed) -> (prompt, answer)
    check: Callable[[str, str], bool]

    def __call__(self, tokenizer, n_tokens: int, index: int, seed: int) -> tuple[str, str]:
        return self.build(tokenizer, n_tokens, index, seed)


_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.8)  # gemma-3-270m itself misses some at 0.9+ (dense)
# The same repetitive filler with the needle swept finely through the second half, where a sparse plan
# lost a key at three quarters of a 14K prompt (issue 28): each sample its own depth and key.
_FINE_DEPTHS = (0.55, 0.6, 0.65, 0.7, 0.72, 0.75, 0.78, 0.8, 0.85, 0.5, 0.4, 0.25)

TASKS: dict[str, Task] = {
    # Passkey samples walk through the depths.
    "passkey": Task(lambda tok, n, i, seed: passkey_prompt(tok, n, _DEPTHS[i % len(_DEPTHS)], seed), passkey_correct),
    "passkey_depths": Task(lambda tok, n, i, seed: passkey_prompt(tok, n, _FINE_DEPTHS[i % len(_FINE_DEPTHS)], seed),
                           passkey_correct),
    "multikey": Task(multikey_prompt, passkey_correct),
    "vt": Task(variable_tracking_prompt, names_correct),
}


def real_text_prompt(tokenizer, n_tokens: int) -> str:
    """About n_tokens of real text: Python's own standard-library sources, concatenated."""
    return text_windows(tokenizer, stdlib_text(tokenizer, n_tokens), n_tokens, 1)[0]


def _concat_until(tokenizer, texts, n_tokens: int, sep: str = "") -> tuple[str, int]:
    """Texts joined until they hold somewhat more than n_tokens (1.2x) tokens -> (text, tokens)."""
    parts, total = [], 0
    for text in texts:
        parts.append(text)
        total += _count(tokenizer, text)
        if total > n_tokens * 1.2:
            break
    return sep.join(parts), total


def stdlib_text(tokenizer, n_tokens: int) -> str:
    """Python's standard-library sources, concatenated, somewhat more than n_tokens of them."""
    import os
    from pathlib import Path

    files = sorted(Path(os.__file__).parent.glob("*.py"))
    return _concat_until(tokenizer, (f.read_text(errors="ignore") for f in files), n_tokens)[0]


def builtin_text(tokenizer, n_tokens: int) -> str:
    """The built-in calibration text, somewhat more than n_tokens of it: Python's language reference
    (English prose, shipped with every Python as pydoc_data.topics), then its standard-library sources
    where more is needed. Prose first because long prompts are mostly documents, not code."""
    from pydoc_data.topics import topics

    text, total = _concat_until(tokenizer, (topics[name] for name in sorted(topics)), n_tokens, "\n\n")
    if total > n_tokens * 1.2:
        return text
    return text + "\n\n" + stdlib_text(tokenizer, int(n_tokens * 1.2) - total)


# --- calibration's long-range retrieval (`vllm-sparse calibrate --data builtin-retrieval`) ----------
# Its own wording, names and value format, unlike the eval tasks above: calibrating on the eval's prompts
# would fit the plan to them.

RETRIEVAL_INTRO = "A few lockers and what they hold are noted in the reference text below; a question follows it."
LOCKER = "The locker of {owner} holds item {item}."
LOCKER_QUESTION = "Which item is in the locker of {owner}? The locker of {owner} holds item"
_OWNERS = ("Agnes", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Keiko",
           "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Stefan", "Tamsin")


def retrieval_prompt(tokenizer, filler: str, n_tokens: int, seed: int, facts: int = 4) -> tuple[str, str]:
    """`facts` lines "The locker of OWNER holds item XY-123." at spread depths (one in each of `facts`
    equal spans of the filler, at a line break), then a question about one of them: the prompt's last
    rows must attend far back. The longest such prompt of at most `n_tokens` tokens, cut from the start
    of `filler` at token granularity (so it has n_tokens unless a token boundary merges), and its answer.
    The same arguments always give the same prompt."""
    rng = random.Random(seed)
    owners = rng.sample(_OWNERS, facts)
    items = [f"{''.join(rng.choices(string.ascii_uppercase, k=2))}-{rng.randint(100, 999)}" for _ in owners]
    depths = [(i + rng.uniform(0.2, 0.8)) / facts for i in range(facts)]
    target = rng.randrange(facts)
    ids = tokenizer(filler, add_special_tokens=False)["input_ids"]

    def render(k):
        if k > len(ids):
            raise ValueError(f"the filler has {len(ids)} tokens, too few for a {n_tokens}-token prompt")
        text = tokenizer.decode(ids[:k])
        for depth, owner, item in reversed(list(zip(depths, owners, items))):
            at = text.find("\n", round(depth * len(text)))
            at = len(text) if at < 0 else at
            text = f"{text[:at]}\n{LOCKER.format(owner=owner, item=item)}{text[at:]}"
        return f"{RETRIEVAL_INTRO}\n\n{text}\n\n{LOCKER_QUESTION.format(owner=owners[target])}"

    return _fit(tokenizer, render, n_tokens), items[target]


def text_windows(tokenizer, text: str, n_tokens: int, count: int) -> list[str]:
    """`count` consecutive windows of the text, each about n_tokens tokens with the special tokens the
    tokenizer adds; a text too short for them is an error naming its length."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    size = n_tokens - 1
    if len(ids) < size * count:
        raise ValueError(f"the text has {len(ids)} tokens; {count} prompt(s) of {n_tokens} tokens need {size * count}")
    return [tokenizer.decode(ids[i * size:(i + 1) * size]) for i in range(count)]
