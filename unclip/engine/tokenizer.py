"""CLIP's byte-level BPE tokenizer without transformers, read from vocab.json + merges.txt.

Serving from an artifact folder must not import transformers, so this rebuilds CLIP's text
pipeline on the `tokenizers` library: whitespace runs collapsed to one space and lower case;
words split by CLIP's pattern (contractions, letter runs, single digits, punctuation runs);
bytes mapped to printable characters; BPE with the end-of-word suffix "</w>"; then
<|startoftext|> ... <|endoftext|>, truncation to the context length and padding. A test checks
ids and masks equal transformers' CLIPTokenizer on the same folder.

The call interface is the subset of transformers' tokenizer call that `Pipeline.tokenize` uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from unclip.errors import UnclipError

# CLIP's pre-tokenisation pattern: special tokens, English contractions, letter runs, one digit,
# runs of other non-space characters (punctuation). Whitespace between matches is dropped.
WORD_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
                r"|[^\s\p{L}\p{N}]+")
DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # CLIP's defaults


@dataclass
class Encoding:
    input_ids: object  # list[int] | list[list[int]] | torch.Tensor
    attention_mask: object


def _token(value) -> str:
    """Special tokens are stored either as a string or as {"content": string, ...}."""
    return value["content"] if isinstance(value, dict) else value


class ClipTokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        folder = Path(folder)
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise UnclipError(f"tokenizer folder {folder} needs vocab.json and merges.txt; "
                              "re-export the model or copy them from its checkpoint")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text()))
        special = {k: _token(config.get(k) or v) for k, v in DEFAULTS.items()}
        self.model_max_length = int(config.get("model_max_length", 77))
        bpe = BPE.from_file(str(vocab), str(merges), unk_token=special["unk_token"],
                            end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.add_special_tokens(list(dict.fromkeys(special.values())))
        ids = {k: tok.token_to_id(v) for k, v in special.items()}
        if None in ids.values():
            missing = [special[k] for k, v in ids.items() if v is None]
            raise UnclipError(f"tokenizer folder {folder}: special tokens {missing} are not in vocab.json")
        bos, eos = special["bos_token"], special["eos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, ids["bos_token"]), (eos, ids["eos_token"])])
        self.pad_token_id = ids["pad_token"]
        self.pad_token = special["pad_token"]
        self._tok = tok

    def __call__(self, text: str | list[str], padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None,
                 verbose: bool = True) -> Encoding:
        single = isinstance(text, str)
        encodings = self._tok.encode_batch([text] if single else list(text))
        ids = [e.ids for e in encodings]
        if truncation:  # keep the end token, as CLIP was trained with it at the last position
            limit = max_length or self.model_max_length
            ids = [x if len(x) <= limit else x[:limit - 1] + x[-1:] for x in ids]
        mask = [[1] * len(x) for x in ids]
        if padding == "max_length" or padding is True:
            width = (max_length or self.model_max_length) if padding == "max_length" else max(map(len, ids))
            mask = [m + [0] * (width - len(m)) for m in mask]
            ids = [x + [self.pad_token_id] * (width - len(x)) for x in ids]
        if return_tensors == "pt":
            import torch

            return Encoding(torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.int64))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' or None")
        return Encoding(ids[0], mask[0]) if single else Encoding(ids, mask)
