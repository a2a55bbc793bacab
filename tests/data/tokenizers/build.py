"""Rebuild the tokenizer fixtures of this folder from the files named in README.md (how each was made).

    python tests/data/tokenizers/build.py --gpt2 DIR --mistral FILE --spm-test FILE --qwen3 DIR

``--gpt2``: a folder holding GPT-2's ``encoder.json`` and ``vocab.bpe``; ``--mistral``: Mistral-7B-v0.1's
SentencePiece ``tokenizer.model``; ``--spm-test``: SentencePiece's own ``test/test_model.model``; ``--qwen3``:
a folder holding Qwen3's ``tokenizer.json`` and ``tokenizer_config.json``. Not run by the tests (they read
the files it wrote); kept so that every converted file can be remade and reviewed.

The SentencePiece models are converted the way Hugging Face's converters made the published files of
their families (transformers' ``LlamaConverter`` with ``legacy=True`` for Llama 2 / Mistral, its
``T5Converter`` of the 4.x releases for T5): the pipeline below is written out because transformers 5
no longer converts a BPE model with ``legacy=True``. Each conversion is checked against SentencePiece
itself on real text before it is written.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPIECE_UNDERLINE = "\u2581"


def write_gz(text: str, path: Path) -> None:
    # mtime=0 and no file name in the header: the same input always gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gpt2(src: Path, out: Path) -> None:
    """GPT-2's BPE as Hugging Face's gpt2 tokenizer.json has it (transformers' GPT2Converter)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = json.loads((src / "encoder.json").read_text(encoding="utf-8"))
    lines = (src / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # line 0: "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in lines if line]
    tok = Tokenizer(BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=True)])
    assert tok.get_vocab_size() == 50257 and tok.token_to_id("<|endoftext|>") == 50256
    assert tok.encode("Hello world").ids == [15496, 995]  # GPT-2's ids, as every GPT-2 port documents
    out.mkdir(exist_ok=True)
    write_gz(tok.to_str(pretty=True), out / "tokenizer.json.gz")
    write_json({"model_max_length": 1024}, out / "tokenizer_config.json")  # what openai-community/gpt2 ships


def _proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _check_against_sentencepiece(tok, model: Path, texts: list[str], exact: bool = True) -> int:
    """How many texts the ``tokenizers`` pipeline encodes differently from SentencePiece (0 asserted if exact)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    bad = [t for t in texts if tok.encode(t, add_special_tokens=False).ids != sp.encode(t)]
    assert not (exact and bad), f"{model}: differs from SentencePiece on {bad[0][:80]!r}"
    return len(bad)


def mistral(model: Path, out: Path, texts: list[str]) -> None:
    """Mistral-7B-v0.1's tokenizer.model as the Llama-2-format tokenizer.json Hugging Face publishes for it:
    Prepend("▁") + Replace(" ", "▁") normalizer, no pre-tokenizer, byte-fallback BPE, <s> post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    proto = _proto(model)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_UNDERLINE),
                                           normalizers.Replace(" ", SPIECE_UNDERLINE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == 32000 and proto.trainer_spec.byte_fallback
    _check_against_sentencepiece(tok, model, texts)
    out.mkdir(exist_ok=True)
    write_gz(tok.to_str(pretty=True), out / "tokenizer.json.gz")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json({  # the keys of mistralai/Mistral-7B-v0.1's tokenizer_config.json
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i, t in enumerate(("<unk>", "<s>", "</s>"))},
        "additional_special_tokens": [], **special, "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": 1000000000000000019884624838656, "pad_token": None, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False}, out / "tokenizer_config.json")
    write_json(special, out / "special_tokens_map.json")


def t5(model: Path, out: Path, texts: list[str]) -> None:
    """A SentencePiece Unigram model as T5's tokenizer.json has it: Precompiled normalizer (the model's NFKC
    charsmap), WhitespaceSplit + Metaspace pre-tokenizer, Unigram, ``$A </s>`` post-processor, 100
    ``<extra_id_N>`` sentinels above the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    proto = _proto(model)
    assert proto.trainer_spec.model_type == 1 and proto.normalizer_spec.precompiled_charsmap  # UNIGRAM
    extra = [f"<extra_id_{i}>" for i in range(99, -1, -1)]
    vocab = [(p.piece, p.score) for p in proto.pieces] + [(t, 0.0) for t in extra]
    tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(SPIECE_UNDERLINE, prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(SPIECE_UNDERLINE, prepend_scheme="always")
    specials = [p.piece for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials + extra])
    eos = proto.pieces[proto.trainer_spec.eos_id].piece
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, proto.trainer_spec.eos_id)])
    # T5's conversion is not exact (SentencePiece keeps NFKC-made spaces its pipeline then removes, and
    # the converted pipeline splits on whitespace before the charsmap would see it): only count.
    print(f"t5: {_check_against_sentencepiece(tok, model, texts, exact=False)} of {len(texts)} texts differ "
          "from SentencePiece")
    out.mkdir(exist_ok=True)
    write_gz(tok.to_str(pretty=True), out / "tokenizer.json.gz")
    write_json({  # the keys of google-t5/t5-small's tokenizer_config.json, with this model's special pieces
        "additional_special_tokens": extra, "eos_token": eos, "extra_ids": 100, "legacy": True,
        "model_max_length": 512, "tokenizer_class": "T5Tokenizer",
        "unk_token": proto.pieces[proto.trainer_spec.unk_id].piece}, out / "tokenizer_config.json")


def qwen3(src: Path, out: Path) -> None:
    """Qwen3's tokenizer.json and tokenizer_config.json, unchanged (only compressed)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    assert tok.get_vocab_size() == 151669 and tok.token_to_id("<|endoftext|>") == 151643
    out.mkdir(exist_ok=True)
    write_gz((src / "tokenizer.json").read_text(encoding="utf-8"), out / "tokenizer.json.gz")
    shutil.copyfile(src / "tokenizer_config.json", out / "tokenizer_config.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpt2", type=Path, required=True)
    p.add_argument("--mistral", type=Path, required=True)
    p.add_argument("--spm-test", type=Path, required=True)
    p.add_argument("--qwen3", type=Path, required=True)
    a = p.parse_args()
    corpus = HERE.parent / "corpus"
    texts = [line for f in ("wikipedia/wikitext-2-raw/wiki.test.raw", "wikipedia/zhwiki/AA/wiki_00",
                            "books/1342-0.txt")
             for line in (corpus / f).read_text(encoding="utf-8-sig").splitlines()[:400] if line.strip()]
    gpt2(a.gpt2, HERE / "gpt2")
    mistral(a.mistral, HERE / "llama2-format", texts)
    t5(a.spm_test, HERE / "t5-unigram", texts)
    qwen3(a.qwen3, HERE / "qwen3")


if __name__ == "__main__":
    main()
