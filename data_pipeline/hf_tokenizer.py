"""Hugging Face tokenizers (the ``tokenizer.json`` of the ``tokenizers`` library): recognising one, its size
and special tokens, loading it for encoding, and training a byte-level BPE (``train-tokenizer --type hf-bpe``).

Recognised by content, never by name alone: lmforge's SentencePiece training writes a ``tokenizer.json`` of
its own beside ``tokenizer.model`` (the record of that training run, format ``lmforge-tokenizer-v1``), while
a Hugging Face one is a JSON object with a ``model`` object and an ``added_tokens`` list. So the outputs of
earlier SentencePiece runs keep meaning what they meant.

- Size: the largest id + 1 over the model's vocabulary and the added tokens (``<|endoftext|>`` and the
  like often sit above the model's vocabulary): what the shard dtype and the model's embedding must hold.
- End of document (``eod``): the ``eos_token`` of ``tokenizer_config.json`` beside the file (what
  ``transformers`` reads), else of ``special_tokens_map.json``, else the first of ``DOCUMENT_TOKENS`` in the
  vocabulary, else an error naming the file. A chat-tuned tokenizer names its turn end as eos
  (``<|im_end|>``, ``<|eot_id|>``, ...: ``is_chat_turn``); that is not a document separator, so when the
  vocabulary also holds a document token (``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``) that
  one is used, and with none the choice is refused, naming both. ``preprocess --eod-token`` overrides
  all of this; the choice and where it came from (file and key) are printed and recorded in the manifest,
  and the trainer takes the data's recorded choice, so preprocess, training and export agree. bos, unk and
  pad come from the same two files only (unk also from the model's ``unk_token``); absent means none (-1).
- Encoding: ``add_special_tokens=False`` (the post-processor's BOS/EOS are not added: the pipeline appends
  the end-of-document id itself, exactly as for SentencePiece), and any truncation or padding recorded in
  the tokenizer.json is switched off, so a document is never cut to some model's context length.
  ``tokenizers`` releases the GIL while it encodes a batch, so preprocess runs its workers as threads.
- Long documents are cut exactly as for SentencePiece (``preprocess.split_exact``: at a single space
  between two non-space characters), but with the space kept at the start of the next piece, when
  ``cuts_before_spaces`` proves the cut exact: no normalizer (or NFC), a pre-tokenizer regex in which a
  space only ever begins a match or lies in a run of whitespace (GPT-2's, Llama 3's, Qwen2's; then
  ByteLevel), and no added token that strips or holds spaces. Other tokenizers get documents whole.

The trained byte-level BPE is GPT-2's design (byte alphabet, GPT-2's pre-tokenizer regex, no unk: every
byte sequence encodes), from the same bounded reservoir sample as the SentencePiece trainer, with
Llama-3's special token names: ``<|begin_of_text|>`` (id 0, added by the post-processor when
``transformers`` asks for special tokens), ``<|end_of_text|>`` (id 1, the end of document), then
``<|pad|>`` with ``--pad`` and the ``--user-symbols``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from lmforge.common.files import atomic_write_bytes, atomic_write_json, sha256_file
from lmforge.common.tokenizer_files import (
    HF_FILE,
    SP_FILE,
    TokenizerError,
    companions,
    read_json_cached,
)

from .sampling import sample_sentences

DOCUMENT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")  # end of a document, most common first
# Chat-turn ends (and starts) that chat-tuned tokenizer configs name as eos: Qwen/Yi/ChatML, Llama 3, Phi-3,
# Gemma, Command-R, Llama 3.1's tool turn. Matched by name, and by these fragments for variants.
CHAT_TURN_TOKENS = ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                    "<start_of_turn>", "<|END_OF_TURN_TOKEN|>", "<|eot|>", "<|end_of_turn|>", "[/INST]")
_CHAT_TURN_RE = re.compile(
    r"im_end|im_start|eot|eom|end_of_turn|start_of_turn|\[/?inst\]|<\|(user|assistant|system)\|>", re.IGNORECASE)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
TRAINING_RECORD = "tokenizer_training.json"  # hf-bpe's record of its training run (SentencePiece's: tokenizer.json)


# Pre-tokenizer regexes in which a space only ever begins a match or lies in a match of whitespace alone, so
# that a text has a match boundary right before a space that follows a non-space character, and the matches
# from there on do not depend on what came before (no look-behind): GPT-2's (also ByteLevel's built-in one),
# Llama 3's (tiktoken's cl100k) and Qwen2's.
_WORD_STARTS_AT_SPACE = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
}


def cuts_before_spaces(path: str | os.PathLike) -> bool:
    """Whether cutting a text right before a space that sits between two non-space characters (the space
    starting the second piece) leaves its tokens unchanged (module docstring), judged from the
    tokenizer.json's normalizer, pre-tokenizer and added tokens. False means: encode texts whole."""
    d = read_json_cached(path)
    norm = d.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":  # NFC: a space never composes with its neighbours
        return False
    pre = d.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        ok = steps[0].get("use_regex", True)
    elif kinds == ["Split", "ByteLevel"]:
        split, byte_level = steps
        ok = (split.get("pattern", {}).get("Regex") in _WORD_STARTS_AT_SPACE and split.get("behavior") == "Isolated"
              and not split.get("invert") and not byte_level.get("use_regex", True))
    else:
        ok = False
    # Added tokens are matched before pre-tokenizing: one that swallows the spaces beside it or holds
    # whitespace could straddle the cut.
    return ok and not any(t.get("lstrip") or t.get("rstrip") or t.get("single_word")
                          or any(c.isspace() for c in t.get("content", "")) for t in d.get("added_tokens", []))


_LOADED: dict = {}


def load(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` for ``path`` with truncation and padding off, loaded once per process (and
    file version); it is safe to share between threads."""
    from tokenizers import Tokenizer

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for a file it cannot read
            raise TokenizerError(f"{path}: not a tokenizer the installed tokenizers library can load ({e})") from None
        tok.no_truncation()
        tok.no_padding()
        _LOADED[key] = tok
    return _LOADED[key]


def vocab_size(tok) -> int:
    """Largest id + 1, added tokens included (ids need not be dense)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", "__type": "AddedToken", ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _named_specials(path: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """Special tokens named in the companion files (tokenizer_config.json first) and where each came from."""
    names: dict[str, str] = {}
    where: dict[str, Path] = {}
    for f in companions(path):
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise TokenizerError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise TokenizerError(f"{f}: not a JSON object")
        for key in SPECIAL_KEYS:
            text = _token_text(d.get(key))
            if text is not None and key not in names:
                names[key], where[key] = text, f
    return names, where


def is_chat_turn(token: str) -> bool:
    """Whether ``token`` marks a chat turn (module docstring) rather than the end of a document."""
    return token in CHAT_TURN_TOKENS or bool(_CHAT_TURN_RE.search(token))


def choose_eod(path: str | os.PathLike, tok=None, eod_token: str | None = None) -> tuple[int, str, str]:
    """(id, token, where from) of the end-of-document token of the tokenizer.json at ``path``: ``eod_token``
    when given (``--eod-token``), else as the module docstring says. TokenizerError names the files."""
    path = Path(path)
    tok = tok or load(path)
    if eod_token is not None:
        i = tok.token_to_id(eod_token)
        if i is None:
            raise TokenizerError(f"--eod-token {eod_token!r} is not a token of {path}")
        return i, eod_token, "--eod-token"
    names, where = _named_specials(path)
    named = names.get("eos_token")
    docs = [t for t in DOCUMENT_TOKENS if tok.token_to_id(t) is not None]
    if named is not None:
        i = tok.token_to_id(named)
        if i is None:
            raise TokenizerError(f"{where['eos_token']}: eos_token {named!r} is not a token of {path}")
        said = f"{where['eos_token'].name} eos_token"
        if not is_chat_turn(named):
            return i, named, said
        if docs:
            return (tok.token_to_id(docs[0]), docs[0],
                    f"the vocabulary: {said} is {named!r}, a chat-turn token, not a document separator")
        raise TokenizerError(
            f"{where['eos_token']}: eos_token {named!r} is a chat-turn token, not an end of document, and "
            f"{path} has none of {', '.join(DOCUMENT_TOKENS)}; choose the separator with --eod-token TOKEN "
            f"(--eod-token {named!r} to use the chat token anyway)")
    if not docs:
        raise TokenizerError(
            f"{path}: cannot tell its end-of-document token: no eos_token in a tokenizer_config.json or "
            f"special_tokens_map.json beside it, and none of {', '.join(DOCUMENT_TOKENS)} in its vocabulary. "
            "Pass --eod-token TOKEN, or write a tokenizer_config.json beside it with \"eos_token\": \"<the token>\"")
    return tok.token_to_id(docs[0]), docs[0], "the vocabulary (no eos_token named beside it)"


def _specials(path: str | os.PathLike, tok, eod_token: str | None) -> tuple[dict[str, int], str, str]:
    """(bos/eos/unk/pad ids, the end-of-document token, where it came from) of the tokenizer.json at ``path``."""
    path = Path(path)
    names, where = _named_specials(path)
    ids = {}
    for key in ("bos_token", "unk_token", "pad_token"):
        name = names.get(key)
        i = tok.token_to_id(name) if name is not None else None
        if name is not None and i is None:
            raise TokenizerError(f"{where[key]}: {key} {name!r} is not a token of {path}")
        ids[key.replace("_token", "_id")] = -1 if i is None else i
    ids["eos_id"], token, source = choose_eod(path, tok, eod_token)
    if ids["unk_id"] < 0:
        unk = read_json_cached(path)["model"].get("unk_token")
        if isinstance(unk, str) and tok.token_to_id(unk) is not None:
            ids["unk_id"] = tok.token_to_id(unk)
    return ids, token, source


def special_ids(path: str | os.PathLike, tok=None, eod_token: str | None = None) -> dict[str, int]:
    """bos/eos/unk/pad ids (-1 = none) of the tokenizer.json at ``path`` (module docstring: where from);
    ``eos_id`` is the end of document (``choose_eod``)."""
    return _specials(path, tok or load(path), eod_token)[0]


def info(path: str | os.PathLike, eod_token: str | None = None) -> dict:
    """sha256, vocab size, special ids and the end of document's token and source (what the manifest
    records), as ``tokenizer.tokenizer_info``."""
    tok = load(path)
    ids, token, source = _specials(path, tok, eod_token)
    return {"sha256": sha256_file(path), "vocab_size": vocab_size(tok), "eos_id": ids["eos_id"],
            "bos_id": ids["bos_id"], "unk_id": ids["unk_id"], "pad_id": ids["pad_id"], "path": str(path),
            "eod_token": token, "eod_source": source}


def special_tokens(path: str | os.PathLike, eod_token: str | None = None) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ...} as text, for a tokenizer_config.json (only those it has); eos is
    the end of document (``choose_eod``)."""
    tok = load(path)
    ids = special_ids(path, tok, eod_token)
    return {f"{k}_token": tok.id_to_token(ids[f"{k}_id"]) for k in ("bos", "eos", "unk", "pad")
            if ids[f"{k}_id"] >= 0}


def train_hf_bpe(
    inputs: list[str],
    output_dir: str,
    vocab_size: int = 32000,
    seed: int = 1234,
    sample_sentences_max: int = 2_000_000,
    sample_bytes_max: int = 1 << 30,
    user_symbols: list[str] | None = None,
    pad: bool = False,
    min_frequency: int = 2,
    read_opts=None,
    fmt: str = "auto",
    wiki_indexes: Sequence[str] = (),
) -> Path:
    """Train a byte-level BPE (module docstring) into ``output_dir``: ``tokenizer.json``,
    ``tokenizer_config.json`` (its class and special tokens, for ``transformers``) and ``tokenizer_training.json``
    (settings, sample statistics, corpus fingerprint), each written atomically. Returns the tokenizer.json."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    from .readers import ReadOptions, expand_inputs, fingerprint

    out = Path(output_dir)
    if (out / SP_FILE).is_file():
        raise TokenizerError(f"{out} holds a SentencePiece tokenizer ({SP_FILE}); choose another --output")
    specials = [BOS, EOS] + ([PAD] if pad else []) + list(user_symbols or [])
    if len(set(specials)) != len(specials):
        raise TokenizerError(f"--user-symbols repeat a special token ({', '.join(specials)})")
    if vocab_size < 256 + len(specials):
        raise TokenizerError(f"--vocab-size {vocab_size} is below the 256 bytes + {len(specials)} special "
                             "tokens a byte-level BPE starts from")
    opts = read_opts or ReadOptions()
    sources = expand_inputs(inputs, fmt, wiki_indexes)
    sentences, stats = sample_sentences(sources, opts, sample_sentences_max, sample_bytes_max, seed)
    if not sentences:
        raise TokenizerError("no text found in the inputs to train a tokenizer on")
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The sample holds lines without their newline; give it back so that merges around "\n" are learned.
    try:
        tok.train_from_iterator((s + "\n" for s in sentences), trainer, length=len(sentences))
    except UnicodeEncodeError as e:  # a lone surrogate (a JSON "\ud800" escape)
        raise TokenizerError(str(e)) from None
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))])
    blob = tok.to_str().encode("utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              **({"pad_token": PAD} if pad else {}), "clean_up_tokenization_spaces": False}
    settings = {"type": "hf-bpe", "vocab_size": vocab_size, "min_frequency": min_frequency,
                "pre_tokenizer": "ByteLevel(add_prefix_space=False, use_regex=True)",
                "special_tokens": specials}
    meta = {
        "format": "lmforge-tokenizer-v1",
        "file": HF_FILE,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "settings": settings,
        "seed": seed,
        "sample": {**stats, "max_sentences": sample_sentences_max, "max_bytes": sample_bytes_max},
        "sources": [{"path": s.path, "size": s.size, "fingerprint": fingerprint(s)} for s in sources],
        "corpus_fingerprint": hashlib.sha256("".join(fingerprint(s) for s in sources).encode()).hexdigest(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / HF_FILE, blob)
    atomic_write_json(out / "tokenizer_config.json", config, indent=2)
    atomic_write_json(out / TRAINING_RECORD, meta, indent=2)
    return out / HF_FILE
