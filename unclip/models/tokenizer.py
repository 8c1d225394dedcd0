"""An offline CLIP-style BPE vocabulary, so presets need no download.

CLIP's tokenizer is byte-level BPE over a fixed byte-to-character table with an end-of-word
marker. We build the same file format (vocab.json + merges.txt, as in Karlo's folder) with
whole-word merges for a small word list; other words fall back to single bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "!"
MAX_LENGTH = 77  # CLIP's context length; the networks' position tables are sized to it

# Words that get a single token each (the demo data set's captions and common prompt words).
WORDS = """
a an the of on in with and at to by over under near from
red green blue yellow white black orange purple pink brown grey gray cyan magenta
circle square triangle star shape disc box dot ball block
background small large big tiny huge left right top bottom center middle
photo painting drawing picture image cat dog bird horse tree house car flower sky sea
""".split()


def _byte_chars() -> list[str]:
    """CLIP's reversible byte -> printable character table (256 entries, printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_vocabulary(words: list[str] = WORDS) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges in CLIP's order: bytes, bytes + '</w>', merged tokens, BOS, EOS."""
    byte_chars = _byte_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    known = set(tokens)
    merges: list[str] = []
    for word in dict.fromkeys(words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            rule = f"{merged} {part}"
            merged += part
            if merged not in known:
                merges.append(rule)
                tokens.append(merged)
                known.add(merged)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, max_length: int = MAX_LENGTH) -> dict[str, int]:
    """Write a CLIPTokenizer folder; returns the special token ids the text encoder needs."""
    vocab, merges = build_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
              "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[PAD],
            "size": len(vocab)}
