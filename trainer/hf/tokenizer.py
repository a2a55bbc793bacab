"""The run's tokenizer -> Hugging Face tokenizer files, and a parity check between the two.

A run trained with a Hugging Face ``tokenizer.json`` exports the same files it was trained with
(``write_hf_tokenizer_files``: tokenizer.json, and tokenizer_config.json / special_tokens_map.json when it
had them; a tokenizer_config.json naming its class and special tokens is written when it had none), and
``check_hf_tokenizer_parity`` checks that ``transformers`` loads them into the ids the ``tokenizers``
library gave the training data. The rest of this module is about SentencePiece models:

Why not ``transformers``' own conversion: in transformers 5 ``LlamaTokenizer`` rebuilds its backend
from vocab + merges with a hard-coded pipeline (no normalizer, Metaspace pre-tokenizer), so a
SentencePiece model trained with the default ``nmt_nfkc`` normalization or ``remove_extra_whitespaces``
would silently tokenize differently. We instead translate the model's own ``normalizer_spec`` into a
``tokenizers`` pipeline, save it as ``tokenizer.json`` and declare ``tokenizer_class:
PreTrainedTokenizerFast`` so that every transformers version loads that file verbatim. Byte fallback is
carried on the BPE model (``byte_fallback=True``) and in the decoder (``ByteFallback`` + ``Fuse``).

The "slow" tokenizer in transformers 5 is ``SentencePieceBackend`` (a python tokenizer over the
``sentencepiece`` library reading ``tokenizer.model``); transformers 4 had ``LlamaTokenizer`` for it.
``check_tokenizer_parity`` compares SentencePiece itself with every one of them that exists.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's escaped space

# Parity texts: English, Chinese, emoji (4-byte UTF-8, outside a small vocab -> byte fallback), digits
# (split_digits), whitespace runs, tabs/newlines, rare scripts and control bytes (byte fallback), NFKC
# candidates (full-width, ligature) and an empty string. Callers add held-out corpus text.
PARITY_TEXTS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! It's 2024-05-17 and π ≈ 3.14159; 1234567890 apples cost $99.95.",
    "数学是研究数量、结构以及空间等概念的一门学科。",
    "混合 mixed 文本 text 123 与 emoji 🚀🔥👍🏽 and 👨‍👩‍👧 family.",
    "  leading spaces, trailing spaces   ",
    "many     spaces\tand\ttabs\n\nnew lines\r\nCRLF   ",
    "ᚠᛇᚻ ᛒᛦᚦ Ꭰ ꓐ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x01\x07 control \u00a0 nbsp",
    "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ ﬁ ligature ① ² Å",
    "",
    " ",
    "a",
    "000 0 00 9",
]


def load_sp_proto(model_file: str | Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as e:  # protobuf raises DecodeError; anything else is equally fatal here
        raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from e
    if not proto.pieces:
        raise ValueError(f"{model_file}: SentencePiece model has no pieces")
    return proto


def _bpe_merges(proto: sp_pb2.ModelProto) -> list[tuple[str, str]]:
    """Merge list that reproduces SentencePiece BPE: it repeatedly joins the adjacent pair whose
    joined piece has the highest score, so a merge's rank is the score order of the piece it makes."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (1, 4)}  # NORMAL, USER_DEFINED
    scored = sorted(((p.score, i, p.piece) for i, p in enumerate(proto.pieces) if p.type == 1),
                    key=lambda t: (-t[0], t[1]))
    merges: list[tuple[str, str]] = []
    for _, _, piece in scored:
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        splits.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        merges.extend(splits)
    return merges


def _normalizer(proto: sp_pb2.ModelProto) -> normalizers.Normalizer | None:
    spec = proto.normalizer_spec
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # SentencePiece drops leading/trailing spaces and folds runs to one (after the charsmap, which
        # is where nmt_nfkc turns tabs/newlines into spaces). \A and \z: onig's ^/$ are line anchors.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    return normalizers.Sequence(steps) if steps else None


def build_fast_tokenizer(proto: sp_pb2.ModelProto, add_bos: bool = True) -> Tokenizer:
    spec = proto.trainer_spec
    if spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise ValueError(f"only BPE SentencePiece models are supported (model_type={spec.model_type})")
    if spec.treat_whitespace_as_suffix:
        raise ValueError("treat_whitespace_as_suffix SentencePiece models are not supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    if len(vocab) != len(proto.pieces):
        raise ValueError("SentencePiece model has duplicate pieces")
    unk = proto.pieces[spec.unk_id].piece
    tok = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(proto), unk_token=unk, fuse_unk=True,
                        byte_fallback=spec.byte_fallback, dropout=None))
    norm = _normalizer(proto)
    if norm is not None:
        tok.normalizer = norm
    # No pre-tokenizer: SentencePiece BPE encodes the whole normalized string, and its pieces never
    # hold "▁" after the first character, so no merge can cross a word boundary anyway.
    dec = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # Control pieces (<unk>, <s>, </s>, <pad>) become special added tokens, as in every Llama export;
    # user-defined pieces are matched verbatim like SentencePiece's prefix matcher does.
    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                            for p in proto.pieces if p.type in (2, 3)])
    user = [AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == 4]
    if user:
        tok.add_tokens(user)
    if add_bos and spec.bos_id >= 0:
        bos = proto.pieces[spec.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)])
    return tok


@dataclass(frozen=True)
class SpecialIds:
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int


def special_ids(proto: sp_pb2.ModelProto) -> SpecialIds:
    s = proto.trainer_spec
    return SpecialIds(s.unk_id, s.bos_id, s.eos_id, s.pad_id)


def write_tokenizer_files(model_file: str | Path, out_dir: str | Path, model_max_length: int) -> SpecialIds:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    out = Path(out_dir)
    proto = load_sp_proto(model_file)
    ids = special_ids(proto)
    shutil.copyfile(model_file, out / "tokenizer.model")
    build_fast_tokenizer(proto).save(str(out / "tokenizer.json"))

    def piece(i: int) -> str | None:
        return proto.pieces[i].piece if i >= 0 else None

    special = {k: v for k, v in {"bos_token": piece(ids.bos_id), "eos_token": piece(ids.eos_id),
                                  "unk_token": piece(ids.unk_id), "pad_token": piece(ids.pad_id)}.items()
               if v is not None}
    config = {
        # PreTrainedTokenizerFast loads tokenizer.json as is (see the module docstring for why not Llama's).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": ids.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "sp_model_kwargs": {},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return ids


def write_hf_tokenizer_files(tokenizer_json: str | Path, out_dir: str | Path, model_max_length: int) -> None:
    """The Hugging Face tokenizer's files as they are (module docstring); returns nothing: its special
    ids are the run's, recorded in the checkpoint."""
    from lmforge.data_pipeline import hf_tokenizer

    src, out = Path(tokenizer_json), Path(out_dir)
    shutil.copyfile(src, out / "tokenizer.json")
    have = hf_tokenizer.companions(src)
    for f in have:
        shutil.copyfile(f, out / f.name)
    if not any(f.name == "tokenizer_config.json" for f in have):
        # PreTrainedTokenizerFast loads tokenizer.json as is, in transformers 4 and 5 alike; the eos found
        # for training (e.g. <|endoftext|> in the vocabulary) is written down for transformers to see.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **hf_tokenizer.special_tokens(src),
                  "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def check_hf_tokenizer_parity(model_dir: str | Path, reference: str | Path, texts: list[str]) -> list[str]:
    """Compare the ``tokenizers`` library on ``reference`` (the run's tokenizer.json: what encoded the
    training data, without special tokens) with each ``transformers`` tokenizer of ``model_dir``; return
    mismatch messages. Per text: ids without special tokens equal; decode equals the reference's
    (special tokens skipped, no clean-up of spaces on either side)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lmforge.data_pipeline import hf_tokenizer

    model_dir = Path(model_dir)
    ref = hf_tokenizer.load(reference)
    toks = {"AutoTokenizer(tokenizer.json)": AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True),
            "PreTrainedTokenizerFast": PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))}
    problems: list[str] = []
    for name, tok in toks.items():
        for text in texts:
            want = ref.encode(text, add_special_tokens=False).ids
            got = list(tok.encode(text, add_special_tokens=False))
            if got != want:
                diff = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
                first = diff[0] if diff else min(len(got), len(want))
                problems.append(f"tokenizer {name}: ids differ from the run's tokenizer.json on {text[:60]!r} at "
                                f"position {first} (transformers {got[first:first + 5]} vs tokenizers "
                                f"{want[first:first + 5]})")
                continue
            want_text = ref.decode(want, skip_special_tokens=True)
            got_text = tok.decode(got, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if got_text != want_text:
                problems.append(f"tokenizer {name}: decode differs on {text[:60]!r}: "
                                f"transformers {got_text[:60]!r} vs tokenizers {want_text[:60]!r}")
    return problems


def _hf_tokenizers(model_dir: Path) -> dict[str, object]:
    """Every Hugging Face tokenizer flavour that can be built from the directory, by name."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    toks: dict[str, object] = {
        "AutoTokenizer(fast, tokenizer.json)": AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True),
        "PreTrainedTokenizerFast": PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json")),
    }
    try:  # transformers >= 5: the python "slow" tokenizer over sentencepiece
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    except ImportError:  # transformers 4: slow LlamaTokenizer is sentencepiece-backed
        from transformers import LlamaTokenizer as SentencePieceBackend
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in cfg}
    toks["slow (sentencepiece-backed)"] = SentencePieceBackend(
        vocab_file=str(model_dir / "tokenizer.model"), legacy=True, add_bos_token=False, **special)
    return toks


def check_tokenizer_parity(model_dir: str | Path, texts: list[str]) -> list[str]:
    """Compare SentencePiece with each HF tokenizer on ``texts``; return a list of mismatch messages.

    Checked per text: ids without special tokens equal SentencePiece's (every flavour); with special
    tokens the fast tokenizer adds exactly BOS; the fast tokenizers' decode gives SentencePiece's decode
    (which equals the text whenever the SentencePiece normalization is lossless for it)."""
    model_dir = Path(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    problems: list[str] = []
    for name, tok in _hf_tokenizers(model_dir).items():
        for text in texts:
            want = sp.encode(text)
            got = tok.encode(text, add_special_tokens=False)
            if list(got) != want:
                got = list(got)
                diff = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
                first = diff[0] if diff else min(len(got), len(want))
                problems.append(f"tokenizer {name}: ids differ from SentencePiece on {text[:60]!r} at "
                                f"position {first} (hf {got[first:first + 5]} vs sp {want[first:first + 5]})")
                continue
            if name.startswith("slow"):
                # transformers 5's generic slow decode joins piece strings, so byte-fallback pieces come
                # back as "<0xE9>" text: a transformers limitation, not ours (same tokenizer.model). Only
                # its ids are held to parity; the fast tokenizer's decode is checked below.
                continue
            want_text = sp.decode(want)
            got_text = tok.decode(got, skip_special_tokens=True)
            if got_text != want_text:
                problems.append(f"tokenizer {name}: decode differs on {text[:60]!r}: "
                                f"hf {got_text[:60]!r} vs sp {want_text[:60]!r}")
        if name.startswith("AutoTokenizer") and sp.bos_id() >= 0:
            with_bos = tok.encode(texts[0])
            if list(with_bos) != [sp.bos_id(), *sp.encode(texts[0])]:
                problems.append(f"tokenizer {name}: add_special_tokens=True does not prepend exactly BOS")
    return problems
