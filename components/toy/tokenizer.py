"""A CLIP BPE tokenizer whose vocabulary covers the toy world's words.

The real SD 1.5 tokenizer has 49,408 tokens; an embedding table that size would dwarf the toy text
encoder. We build a genuine `transformers.CLIPTokenizer` (vocab.json + merges.txt, same byte-level
BPE, same special tokens) whose merges turn every toy word into a single token, and whose byte-level
base tokens still spell out any other word.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from components.toy import world as tw


EXTRA_WORDS = """a an the of on in at and with two photo picture image drawing object thing shape
background sketch pixel art beach grass night top bottom left right center small medium large
solid striped dotted checkered sky sand stars dark bright light""".split()

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def toy_words() -> list[str]:
    words = list(tw.COLOURS) + tw.SHAPES + [tw.PLURALS.get(s, s + "s") for s in tw.SHAPES] + EXTRA_WORDS
    return list(dict.fromkeys(words))  # ordered, unique


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the lowest-ranked adjacent pair (what CLIPTokenizer does)."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
        parts = _bpe(symbols, ranks)
        # merges appended later rank higher, so earlier words keep tokenising exactly as before
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
            parts = [pair[0] + pair[1]] + parts[2:]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def save_toy_tokenizer(out: str | Path, max_length: int = 32) -> CLIPTokenizer:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(toy_words())
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=EOS)
    tokenizer.save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)
