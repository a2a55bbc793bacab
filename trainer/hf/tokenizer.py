"""The run's tokenizer -> Hugging Face tokenizer files, and a parity check between the two.

A run trained with a Hugging Face ``tokenizer.json`` exports that file byte for byte, with a
tokenizer_config.json derived from the source's (``write_hf_tokenizer_files``, ``hf_tokenizer_config``:
``tokenizer_class: PreTrainedTokenizerFast``, the run's eos, the keys that make transformers rebuild or
rewrite the pipeline dropped, each change returned as one line with its reason), and
``check_hf_tokenizer_parity`` checks that ``transformers``' AutoTokenizer loads them into the ids the
``tokenizers`` library gave the training data, naming where and why they differ when they do. The rest of
this module is about SentencePiece models:

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

# Parity texts: English, German (umlauts, ß: precomposed letters a normalizer may touch), Chinese, emoji
# (4-byte UTF-8, outside a small vocab -> byte fallback), digits (split_digits), one and several leading
# and trailing spaces (where Llama-style "▁" prefixes differ), whitespace runs, tabs/newlines at the start,
# rare scripts and control bytes (byte fallback), NFKC candidates (full-width, ligature) and an empty
# string. Callers add held-out corpus text.
PARITY_TEXTS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! It's 2024-05-17 and π ≈ 3.14159; 1234567890 apples cost $99.95.",
    "Grüße aus Köln: Die Straße ist groß, Äpfel und Öl kosten 5 € – übermäßig schön.",
    "数学是研究数量、结构以及空间等概念的一门学科。",
    "混合 mixed 文本 text 123 与 emoji 🚀🔥👍🏽 and 👨‍👩‍👧 family.",
    "  leading spaces, trailing spaces   ",
    " one leading space",
    "one trailing space ",
    "many     spaces\tand\ttabs\n\nnew lines\r\nCRLF   ",
    "\tTab first\n\nand newlines first and last\n",
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


# --- Hugging Face tokenizer.json runs -------------------------------------------------------------------
# The exported tokenizer_config.json keeps what users need from the source's and names the class that
# loads tokenizer.json as is; every other key is dropped, because in transformers 5 AutoTokenizer takes the
# class from tokenizer_config.json (LlamaTokenizer, T5Tokenizer, Qwen2Tokenizer... rebuild their backend
# from vocab + merges with a hard-coded pipeline) and passes every key to it as a keyword argument, and
# some keywords rewrite the pipeline (add_bos_token/add_eos_token: the post-processor; add_prefix_space:
# the pre-tokenizer in transformers 4; legacy: LlamaTokenizer's normalizer).
FAST_CLASS = "PreTrainedTokenizerFast"  # transformers 4's class; transformers 5's alias of TokenizersBackend
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
SPECIAL_LISTS = ("additional_special_tokens", "extra_special_tokens")
KEPT_KEYS = (*NAMED_SPECIALS, *SPECIAL_LISTS, "added_tokens_decoder", "chat_template", "padding_side",
             "truncation_side", "clean_up_tokenization_spaces", "spaces_between_special_tokens",
             "model_input_names", "split_special_tokens")
_WHY_DROPPED = {
    "legacy": "read only by LlamaTokenizer/T5Tokenizer, which rebuild the pipeline from the vocabulary",
    "add_bos_token": "transformers 5 rebuilds the post-processor from it; the export keeps tokenizer.json's own",
    "add_eos_token": "transformers 5 rebuilds the post-processor from it; the export keeps tokenizer.json's own",
    "sp_model_kwargs": "options of a SentencePiece model, which the export does not have",
    "auto_map": "custom tokenizer code (not exported) that would replace tokenizer.json's pipeline",
    "from_slow": "would rebuild the tokenizer from a slow tokenizer instead of loading tokenizer.json",
    "extra_ids": "T5Tokenizer's count of sentinel tokens: tokenizer.json already holds them",
}
for _k in ("tokenizer_file", "vocab_file", "merges_file", "name_or_path"):
    _WHY_DROPPED[_k] = "a path on the machine that saved it"


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"__type": "AddedToken", "content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) or len(value) < 60 else \
        json.dumps(value[:57] + "...", ensure_ascii=False)


def _special_effect(tok) -> str:
    """What tokenizer.json's post-processor adds with add_special_tokens=True, in words."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    k = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if k is None or full == plain:
        return "adds no special token" if full == plain else "changes the ids"
    before = [tok.id_to_token(i) for i in full[:k]]
    after = [tok.id_to_token(i) for i in full[k + len(plain):]]
    return "adds " + " and ".join(x for x in (f"{' '.join(before)} before" if before else "",
                                              f"{' '.join(after)} after" if after else "") if x)


def hf_tokenizer_config(source: dict, tokenizer_json: dict, tok, model_max_length: int,
                        ids: dict[str, int]) -> tuple[dict, list[str]]:
    """The export's tokenizer_config.json from the source's (``source``, {} if it had none) and the lines
    saying what changed and why. ``ids``: the run's bos/eos/pad ids (eos: its end of document)."""
    f = "tokenizer_config.json"
    changes: list[str] = []
    cfg: dict = {}
    old_class = source.get("tokenizer_class")
    if old_class != FAST_CLASS:
        why = ("none named: AutoTokenizer would pick the class registered for the model type (Qwen2Tokenizer "
               "for qwen3), which rebuilds the pipeline" if old_class is None else
               "transformers 5's name for the same class; transformers 4 knows only PreTrainedTokenizerFast"
               if old_class == "TokenizersBackend" else
               f"{old_class} rebuilds the pipeline from the vocabulary with its own fixed settings instead of "
               "loading tokenizer.json, so its ids can differ (LlamaTokenizer: a leading \"▁\", spaces at the "
               "start of a text)")
        changes.append(f"{f}: tokenizer_class {old_class} -> {FAST_CLASS} ({why}; {FAST_CLASS} loads "
                       "tokenizer.json as is in transformers 4 and 5)")
    cfg["tokenizer_class"] = FAST_CLASS
    for key, value in source.items():
        if key in KEPT_KEYS:
            cfg[key] = value
        elif key not in ("tokenizer_class", "model_max_length", "add_prefix_space"):
            why = _WHY_DROPPED.get(key, f"not a setting of {FAST_CLASS}, which loads tokenizer.json as is")
            changes.append(f"{f}: dropped {key} {_show(value)} ({why})")

    as_dict = [k for k in NAMED_SPECIALS if isinstance(cfg.get(k), dict)]
    for key in as_dict:
        cfg[key] = _token_text(cfg[key])
    if as_dict:
        changes.append(f"{f}: {', '.join(as_dict)}: AddedToken objects -> their text (the tokens' settings are "
                       "tokenizer.json's; transformers would add them again with the object's settings)")
    for key in NAMED_SPECIALS:
        text = _token_text(cfg.get(key))
        if text is not None and tok.token_to_id(text) is None:
            del cfg[key]
            changes.append(f"{f}: dropped {key} {text!r}: not a token of tokenizer.json (transformers would "
                           "add it as a new id and encode that text as one token)")
    for key, i in (("eos_token", ids.get("eos_id", -1)), ("bos_token", ids.get("bos_id", -1)),
                   ("pad_token", ids.get("pad_id", -1))):
        if i is None or i < 0 or tok.id_to_token(i) is None:
            continue
        want, have = tok.id_to_token(i), _token_text(cfg.get(key))
        if have != want:
            cfg[key] = want
            what = "the end of document the run trained with" if key == "eos_token" else "the run's"
            changes.append(f"{f}: {key} {have!r} -> {want!r} ({what}, id {i}, recorded in the checkpoint)")
    for key in SPECIAL_LISTS:
        if isinstance(cfg.get(key), list):
            missing = [t for t in cfg[key] if tok.token_to_id(_token_text(t) or "") is None]
            if missing:
                cfg[key] = [t for t in cfg[key] if t not in missing]
                changes.append(f"{f}: {key}: dropped {', '.join(repr(_token_text(t)) for t in missing)} (not "
                               "tokens of tokenizer.json: transformers would add them as new ids)")

    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    for sid, d in (cfg.get("added_tokens_decoder") or {}).items():
        t = added.get(int(sid), {})
        diff = [k for k in ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
                if k in d and d[k] != t.get(k)]
        if diff:
            del cfg["added_tokens_decoder"]
            changes.append(f"{f}: dropped added_tokens_decoder (id {sid} has {', '.join(f'{k}={d[k]!r}' for k in diff)}"
                           f" there, {', '.join(f'{k}={t.get(k)!r}' for k in diff)} in tokenizer.json: transformers "
                           "would add the token again with those settings)")
            break
    if cfg.get("split_special_tokens"):
        cfg["split_special_tokens"] = False
        changes.append(f"{f}: split_special_tokens true -> false (the run encoded special-token text as the "
                       "special token, as the tokenizers library does)")

    # transformers 4's fast tokenizer sets the pre-tokenizer's add_prefix_space to this key (default false):
    # write the pre-tokenizer's own value where it has one, and no key where it has none.
    pre = tokenizer_json.get("pre_tokenizer") or {}
    have = source.get("add_prefix_space")
    if "add_prefix_space" in pre:
        cfg["add_prefix_space"] = pre["add_prefix_space"]
        if have is not None and have != pre["add_prefix_space"]:
            changes.append(f"{f}: add_prefix_space {have} -> {pre['add_prefix_space']} (tokenizer.json's "
                           "pre-tokenizer setting, which transformers 4 would otherwise overwrite)")
    elif have is not None:
        changes.append(f"{f}: dropped add_prefix_space {_show(have)} (tokenizer.json's pre-tokenizer has no such "
                       "setting" + ("; true makes LlamaTokenizer prepend a \"▁\" the pipeline does not have)"
                                    if have else ")"))
    if "clean_up_tokenization_spaces" not in cfg:
        cfg["clean_up_tokenization_spaces"] = False
        changes.append(f"{f}: clean_up_tokenization_spaces absent -> false (transformers 4 defaults to true, "
                       "which drops spaces before punctuation when decoding)")
    if source.get("model_max_length") != model_max_length:
        changes.append(f"{f}: model_max_length {_show(source.get('model_max_length'))} -> {model_max_length} "
                       "(the model's max_position_embeddings)")
    cfg["model_max_length"] = model_max_length
    if source.get("add_bos_token") is not None or source.get("add_eos_token") is not None:
        changes.append(f"tokenizer.json: its post-processor {_special_effect(tok)} with add_special_tokens=True "
                       "(the export's behaviour in every transformers version)")
    for what in ("truncation", "padding"):
        if tokenizer_json.get(what):
            changes.append(f"tokenizer.json: copied with its {what} setting {_show(tokenizer_json[what])} "
                           f"(transformers applies it only when a call asks for {what}; lmforge encoded without it)")
    return cfg, changes


def write_hf_tokenizer_files(tokenizer_json: str | Path, out_dir: str | Path, model_max_length: int,
                             special_ids: dict[str, int] | None = None) -> list[str]:
    """The run's Hugging Face tokenizer for ``transformers``: tokenizer.json copied byte for byte, and a
    tokenizer_config.json / special_tokens_map.json derived from the ones beside it (``hf_tokenizer_config``)
    so that AutoTokenizer reproduces the ids the training data was encoded with. ``special_ids``: the run's
    bos/eos/pad ids as the checkpoint records them (default: read from the files). Returns what changed
    against the source's files and why, one line each."""
    from lmforge.data_pipeline import hf_tokenizer

    src, out = Path(tokenizer_json), Path(out_dir)
    shutil.copyfile(src, out / "tokenizer.json")
    source: dict = {}
    for f in hf_tokenizer.companions(src):  # tokenizer_config.json first: its keys win, as in transformers
        d = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(d, dict):
            source = {**d, **source} if f.name == "special_tokens_map.json" else {**source, **d}
    tok = hf_tokenizer.load(src)
    ids = special_ids if special_ids is not None else hf_tokenizer.special_ids(src, tok)
    tj = json.loads(src.read_text(encoding="utf-8-sig"))
    config, changes = hf_tokenizer_config(source, tj, tok, model_max_length, ids)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {k: config[k] for k in (*NAMED_SPECIALS, *SPECIAL_LISTS) if config.get(k) is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return changes


def _diagnose(tok, ref) -> str:
    """Why ``tok`` (transformers) may encode differently from ``ref`` (tokenizers): its class, and the first
    part of its backend pipeline that is not the reference's."""
    why = []
    cls = type(tok).__name__
    if cls not in ("TokenizersBackend", FAST_CLASS):
        why.append(f"AutoTokenizer loaded {cls}, which builds its own pipeline instead of loading tokenizer.json "
                   f"as is (tokenizer_config.json's tokenizer_class; {FAST_CLASS} would not)")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        mine, theirs = json.loads(backend.to_str()), json.loads(ref.to_str())
        for part in ("normalizer", "pre_tokenizer", "model", "added_tokens"):
            if part == "model":
                a = {k: v for k, v in mine["model"].items() if k not in ("vocab", "merges")}
                b = {k: v for k, v in theirs["model"].items() if k not in ("vocab", "merges")}
            else:
                a, b = mine.get(part), theirs.get(part)
            if a != b:
                why.append(f"its {part} is {_show(a)[:200]}, tokenizer.json's is {_show(b)[:200]}")
        if getattr(backend, "encode_special_tokens", False):
            why.append("it splits special-token text into pieces (split_special_tokens)")
    return "; ".join(why) or "unknown: the two pipelines serialize the same"


def _tokens(tok_ids: list[int], ref, at: int) -> str:
    return repr([ref.id_to_token(i) for i in tok_ids[at:at + 4]])


def check_hf_tokenizer_parity(model_dir: str | Path, reference: str | Path, texts: list[str]) -> list[str]:
    """Compare the ``tokenizers`` library on ``reference`` (the run's tokenizer.json: what encoded the
    training data, without special tokens) with each ``transformers`` tokenizer of ``model_dir``; return
    mismatch messages: the text, the first position that differs, both sides' tokens from there (and ids),
    and why, when the loaded class or its pipeline tells. Per text: ids without special tokens equal;
    decode equals the reference's (special tokens skipped, no clean-up of spaces on either side)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lmforge.data_pipeline import hf_tokenizer

    model_dir = Path(model_dir)
    ref = hf_tokenizer.load(reference)
    toks = {"AutoTokenizer": AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True),
            "PreTrainedTokenizerFast(tokenizer.json)": PreTrainedTokenizerFast(
                tokenizer_file=str(model_dir / "tokenizer.json"))}
    problems: list[str] = []
    for name, tok in toks.items():
        bad = 0
        for text in texts:
            want = ref.encode(text, add_special_tokens=False).ids
            got = list(tok.encode(text, add_special_tokens=False))
            if got != want:
                bad += 1
                diff = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
                at = diff[0] if diff else min(len(got), len(want))
                problems.append(
                    f"tokenizer {name} ({type(tok).__name__}): ids differ from the run's tokenizer.json on "
                    f"{text[:60]!r} at position {at}: transformers {_tokens(got, ref, at)} {got[at:at + 4]}, "
                    f"tokenizers {_tokens(want, ref, at)} {want[at:at + 4]}")
                continue
            want_text = ref.decode(want, skip_special_tokens=True)
            got_text = tok.decode(got, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if got_text != want_text:
                bad += 1
                problems.append(f"tokenizer {name} ({type(tok).__name__}): decode differs on {text[:60]!r}: "
                                f"transformers {got_text[:60]!r} vs tokenizers {want_text[:60]!r}")
        if bad:
            problems.append(f"tokenizer {name}: {bad} of {len(texts)} texts differ; why: {_diagnose(tok, ref)}")
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
