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
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from unclip.errors import UnclipError, schema_error

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


class _SpecialToken(BaseModel):
    content: Annotated[str, Field(min_length=1)]


class _TokenizerConfig(BaseModel):
    """The keys of tokenizer_config.json / special_tokens_map.json read here (others are ignored).
    CLIP's context is 77 tokens; 4096 bounds the padded batch a bad file could ask for."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model_max_length: Annotated[int, Field(ge=2, le=4096)] = 77
    bos_token: Annotated[str, Field(min_length=1)] | _SpecialToken | None = None
    eos_token: Annotated[str, Field(min_length=1)] | _SpecialToken | None = None
    unk_token: Annotated[str, Field(min_length=1)] | _SpecialToken | None = None
    pad_token: Annotated[str, Field(min_length=1)] | _SpecialToken | None = None


class _Vocabulary(BaseModel):
    """tokenizer.json's BPE model: the part that must agree with vocab.json + merges.txt."""

    vocab: dict[str, int]
    merges: list[str | tuple[str, str]]


class _TokenizerJson(BaseModel):
    model: _Vocabulary


def _read_json(path: Path, fix: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnclipError(f"{path} cannot be read ({exc}); {fix}") from None


def _merges(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UnclipError(f"{path} cannot be read ({exc}); re-save the model's tokenizer") from None
    return [line for line in lines if line.strip() and not line.startswith("#version")]


def check_vocabulary_files(folder: Path) -> None:
    """vocab.json + merges.txt (Karlo's layout, what the ONNX runtime reads) and tokenizer.json
    (what transformers reads when present) must describe one vocabulary: if they disagree, the
    backends would tokenise differently. We refuse rather than pick one, since either may be the
    stale copy; the message says which files to keep in agreement."""
    folder = Path(folder)
    vocab, merges, full = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    fix = ("keep one vocabulary: delete tokenizer.json to use vocab.json + merges.txt, or delete "
           "those two to use tokenizer.json (unclip export writes them from it)")
    if vocab.exists() != merges.exists():
        present, absent = (vocab, merges) if vocab.exists() else (merges, vocab)
        raise UnclipError(f"{present} has no {absent.name} beside it: the two are read together; {fix}")
    if not (vocab.exists() and full.exists()):
        return
    pair = _read_json(vocab, fix)
    try:
        pair = TypeAdapter(dict[str, int]).validate_python(pair, strict=True)
        model = _TokenizerJson.model_validate(_read_json(full, fix)).model
    except ValidationError as exc:
        raise schema_error(exc, where=f"{folder}: ", fix=fix) from None
    if pair != model.vocab:
        differ = len(set(pair.items()) ^ set(model.vocab.items()))
        raise UnclipError(f"{vocab} and {full.name} disagree ({differ} token entries differ): the torch "
                          f"and ONNX backends would tokenise differently; {fix}")
    if _merges(merges) != [m if isinstance(m, str) else " ".join(m) for m in model.merges]:
        raise UnclipError(f"{merges} and {full.name} disagree (different BPE merges): the torch and ONNX "
                          f"backends would tokenise differently; {fix}")


class ClipTokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        folder = Path(folder)
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise UnclipError(f"tokenizer folder {folder} needs vocab.json and merges.txt; "
                              "re-export the model or copy them from its checkpoint")
        check_vocabulary_files(folder)
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (folder / name).is_file():
                data = _read_json(folder / name, "re-export the model")
                try:
                    config.update(_TokenizerConfig.model_validate(data).model_dump(exclude_unset=True))
                except ValidationError as exc:
                    raise schema_error(exc, where=f"{folder / name}: ", fix="re-export the model",
                                       data=data) from None
        special = {k: _token(config.get(k) or v) for k, v in DEFAULTS.items()}
        self.model_max_length = int(config.get("model_max_length", 77))
        try:
            bpe = BPE.from_file(str(vocab), str(merges), unk_token=special["unk_token"],
                                end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own types
            raise UnclipError(f"tokenizer files in {folder} cannot be read ({str(exc)[:200]}); "
                              "re-export the model") from None
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
