"""Command line: ``python -m lmforge.data_pipeline {train-tokenizer,preprocess,inspect,verify,merge} ...``.

``main(argv)`` is also what ``lmforge train-tokenizer|preprocess|inspect|verify|merge`` dispatches to.
Exit codes follow ``common.errors``: 0 done, 2 bad input (an ``error:`` line), 1 ``verify`` found
problems or an internal error (with its traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmforge.common.errors import EXIT_FAILED, run_cli

if TYPE_CHECKING:  # the commands import their modules when they run: --help stays instant
    from .readers import ReadOptions

EPILOG = """examples:
  python -m lmforge.data_pipeline train-tokenizer --input corpora/books corpora/wikipedia --vocab-size 32000 \\
      --output tok/
  python -m lmforge.data_pipeline train-tokenizer --type hf-bpe --input corpora/ --vocab-size 32000 --output hftok/
  python -m lmforge.data_pipeline preprocess --input 'pile/*.jsonl.zst' --tokenizer tok/tokenizer.model \\
      --output data/ --workers 16 --valid-fraction 0.01
  mpirun -n 4 python -m lmforge.data_pipeline preprocess ...   (same bytes as one process)
  python -m lmforge.data_pipeline inspect data/ ; python -m lmforge.data_pipeline verify data/
"""


def _size(text: str) -> int:
    """'64M', '1G', '500k' or plain bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def _add_read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories (read recursively, sorted), globs, or hf:NAME[:CONFIG][@SPLIT] "
                        "for a Hugging Face dataset (streamed). .gz/.zst are decompressed on the fly.")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "wikidoc", "text", "parquet", "mediawiki"],
                   help="input format; auto = by suffix (.jsonl/.json, .txt, .parquet), else sniffed: "
                        "'<doc' = WikiExtractor, '<mediawiki' = a raw MediaWiki XML dump (.xml, .xml.bz2, ...), "
                        "'{' = JSON lines, anything else = one text document per file")
    p.add_argument("--wiki-index", nargs="+", default=None, metavar="PATH",
                   help="the index (...-multistream-index.txt.bz2, lines OFFSET:PAGEID:TITLE) of a raw MediaWiki "
                        "...-multistream.xml.bz2 dump; one per dump, in input order. Default: NAME-index.txt.bz2 "
                        "beside NAME.xml.bz2. With its index a dump is split into units of whole bz2 streams "
                        "(--unit-bytes) across ranks; without one it is one unit, read by one rank. "
                        "Articles only (namespace 0; redirects and other namespaces are counted as skipped), "
                        "wikitext made plain text with mwparserfromhell, the title as the first line (see --titles) "
                        "(docs/data-pipeline.md, Raw MediaWiki dumps)")
    p.add_argument("--titles", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an article's title as its document's first line (default), or drop it and keep the "
                        "text alone (--no-titles): WikiExtractor <doc> files (the title is the line after <doc ...>) "
                        "and raw MediaWiki dumps; other formats (JSON lines, text, parquet, hf:) ignore it")
    p.add_argument("--text-key", default="text", help="JSON/parquet field holding the text (default: text)")
    p.add_argument("--strip-gutenberg", action="store_true",
                   help="drop Project Gutenberg headers/footers from text files")
    p.add_argument("--max-doc-bytes", type=_size, default=8 << 20,
                   help="documents longer than this are streamed in pieces, never loaded whole (default 8M)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmforge.data_pipeline",
        description="lmforge offline data pipeline: train a tokenizer (SentencePiece, or a Hugging Face "
        "byte-level BPE) and tokenize corpora into Megatron-compatible MMIDIDX shards with a manifest.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train-tokenizer", help="train a SentencePiece or Hugging Face byte-level BPE tokenizer",
                       description="Train a tokenizer from a bounded reservoir sample of the input stream. "
                       "--type sentencepiece (default): SentencePiece (byte fallback, digit splitting, unk=0 "
                       "bos=1 eos=2); writes DIR/tokenizer.model and DIR/tokenizer.json (lmforge's record: "
                       "settings, sample statistics, corpus fingerprint). --type hf-bpe: a byte-level BPE "
                       "with the Hugging Face tokenizers library (GPT-2's byte alphabet and pre-tokenizer, no "
                       "unk; <|begin_of_text|>=0 as bos, <|end_of_text|>=1 as eos and end of document); writes "
                       "DIR/tokenizer.json and DIR/tokenizer_config.json (what transformers loads) and "
                       "DIR/tokenizer_training.json (the record). Either DIR is a --tokenizer for preprocess "
                       "and the trainer.")
    _add_read_args(t)
    t.add_argument("--output", required=True, metavar="DIR")
    t.add_argument("--type", dest="tokenizer_type", default="sentencepiece", choices=["sentencepiece", "hf-bpe"],
                   help="tokenizer library and model (default sentencepiece)")
    t.add_argument("--vocab-size", type=int, default=32000, help="pieces, special tokens included (default 32000)")
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece model (default bpe)")
    t.add_argument("--seed", type=int, default=1234, help="reservoir sampling seed (output is deterministic)")
    t.add_argument("--sample-sentences", type=int, default=2_000_000,
                   help="at most this many lines are sampled (bounded memory)")
    t.add_argument("--sample-bytes", type=_size, default=1 << 30, help="and at most this many characters")
    t.add_argument("--user-symbols", nargs="*", default=[], help="extra special tokens kept whole")
    t.add_argument("--pad", action="store_true",
                   help="add a pad token (SentencePiece <pad> id 3, hf-bpe <|pad|> id 2); off by default (Llama)")
    t.add_argument("--character-coverage", type=float, default=0.9995, help="SentencePiece only")
    t.add_argument("--min-frequency", type=int, default=2, help="hf-bpe only: a merge's pairs must occur this often")
    t.add_argument("--threads", type=int, default=None,
                   help="SentencePiece trainer threads (default: all cores; hf-bpe uses all cores)")

    p = sub.add_parser("preprocess", help="tokenize inputs into MMIDIDX shards + manifest.json",
                       description="Tokenize documents into Megatron MMIDIDX .bin/.idx shards under OUT/train "
                       "and OUT/valid, listed in OUT/manifest.json. Output bytes are identical for any "
                       "--workers and any number of MPI ranks (mpirun -n K). Rerunning the same command "
                       "resumes after a crash, keeping checksum-verified finished work.")
    _add_read_args(p)
    p.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="a SentencePiece .model, a Hugging Face tokenizer.json, or a directory holding one (its "
                        "tokenizer.json if Hugging Face's, else its tokenizer.model). Documents are encoded "
                        "without the tokenizer's own special tokens; the end of document is appended (--eod-token)")
    p.add_argument("--output", required=True, metavar="OUT")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer workers per rank, and as many processes converting the wikitext of a "
                        "MediaWiki .bz2 dump (default: all cores)")
    p.add_argument("--backend", choices=("auto", "thread", "process"), default="auto",
                   help="tokenizer workers as threads (SentencePiece builds that release the GIL while "
                        "encoding, and Hugging Face tokenizers) or processes; auto picks threads when possible. "
                        "Output bytes never depend on it")
    p.add_argument("--threads-per-worker", type=int, default=1,
                   help="SentencePiece C++ threads inside each worker's batch encode (default 1; a Hugging Face "
                        "tokenizer spreads each batch over its own thread pool)")
    p.add_argument("--valid-fraction", type=float, default=0.01,
                   help="fraction of documents (by text hash) written to the valid split (default 0.01)")
    p.add_argument("--max-shard-bytes", type=_size, default=1 << 30, help="shard .bin size bound (default 1G)")
    p.add_argument("--unit-bytes", type=_size, default=64 << 20,
                   help="input bytes per work unit: the resume and MPI granularity (default 64M). Small "
                        "files are grouped; an uncompressed .jsonl or WikiExtractor file larger than this is "
                        "cut into byte ranges at record boundaries, a parquet file into runs of whole row "
                        "groups of about this size (compressed), a MediaWiki .xml.bz2 dump with its index into "
                        "runs of whole bz2 streams; .gz/.zst and text files are one unit each. "
                        "Output shards are per unit: the same --unit-bytes gives the same bytes for any "
                        "--workers/ranks; another --unit-bytes gives the same documents in "
                        "the same order in differently cut shards")
    p.add_argument("--eod-token", default=None, metavar="TOKEN",
                   help="the token appended after every document. Default: a SentencePiece model's eos piece; for "
                        "a tokenizer.json the eos_token of the tokenizer_config.json (or special_tokens_map.json) "
                        "beside it, else <|endoftext|>/<|end_of_text|>/</s>/<eos> from its vocabulary; a chat-turn "
                        "eos (<|im_end|>, <|eot_id|>, ...) gives way to such a document token, and is refused if "
                        "there is none. The choice and its source are printed and recorded in the manifest; the "
                        "trainer and export use the data's choice")
    p.add_argument("--no-eod", dest="append_eod", action="store_false",
                   help="do not append the EOD (eos) id to each document")
    p.add_argument("--keep-empty", action="store_true",
                   help="keep empty documents as empty index entries (what Megatron does) instead of skipping")
    p.add_argument("--filter", dest="filters", default="", metavar="RULE[,RULE...]",
                   help="remove low-quality documents, counted as skipped by rule: gopher (words, mean_word_length, "
                        "symbol_ratio, bullet_lines, ellipsis_lines, alpha_words), repetition (dup_lines, "
                        "dup_paragraphs, top_ngram) or single rules; thresholds in data_pipeline/preprocess/"
                        "quality.py (Gopher's), with no upper length bound: documents of 20,000+ words (books) are "
                        "judged by pieces of about 10,000 words; Han and kana count 1.5 characters per word. Every "
                        "removal is listed with what was measured in OUT/filtered/. Off by default")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="skip documents of fewer tokens than this (reason filter-min_tokens; default 0: off)")
    p.add_argument("--dedup", default="", metavar="exact|minhash|exact,minhash",
                   help="remove duplicate documents, keeping the first in input order across all inputs, workers "
                        "and ranks (counted as skipped: duplicate-exact, duplicate-near). exact: equal after NFC "
                        "and whitespace collapsing; minhash: near duplicates by MinHash LSH over word n-grams "
                        "(data_pipeline/preprocess/dedup.py: detection rates, memory); each near-duplicate removal "
                        "is checked against the document kept for it (true Jaccard of the shingles >= "
                        "--minhash-threshold). Every removal is listed in OUT/duplicates/. Adds a scan pass "
                        "before tokenizing. Off by default")
    p.add_argument("--minhash-threshold", type=float, default=None,
                   help="Jaccard similarity at which a pair is found with probability 1/2; picks LSH bands x "
                        "rows within --minhash-perm (default 0.72: 14 bands x 8 rows, FineWeb's; pairs at 0.8 "
                        "are found 92%% of the time, at 0.5 5%%), and is the true Jaccard a found near "
                        "duplicate must reach against the kept document to be removed")
    p.add_argument("--minhash-perm", type=int, default=112,
                   help="MinHash values per document available to --minhash-threshold (default 112)")
    p.add_argument("--minhash-ngram", type=int, default=5, help="words per shingle for --dedup minhash (default 5)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="skip bad records and count them by reason (default), or stop at the first one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output of a different job")
    p.add_argument("--fingerprint", choices=["sampled", "full"], default="sampled",
                   help="how inputs are fingerprinted for the resume/changed-input check (recorded in the "
                        "manifest as fingerprint_method): sampled = size + 16 x 64 KiB blocks per file "
                        "(default: fast on huge corpora, misses same-size edits between the blocks); "
                        "full = sha256 of every byte (reads the corpus once more, split across MPI ranks)")
    p.add_argument("--batch-chars", type=_size, default=1 << 20, help="characters per tokenizer batch")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    i = sub.add_parser("inspect", help="statistics, token histogram summary, decoded samples")
    i.add_argument("output", metavar="OUT")
    i.add_argument("--samples", type=int, default=3, help="documents to decode")
    i.add_argument("--chars", type=int, default=300, help="characters shown per sample")

    v = sub.add_parser("verify", help="recompute every shard checksum and check the index structure")
    v.add_argument("output", metavar="OUT")

    m = sub.add_parser("merge", help="combine several outputs (same tokenizer) into one dataset",
                       description="Copy the shards of several preprocess outputs into OUT with a merged "
                       "manifest (shards renamed by input order; checksums verified).")
    m.add_argument("inputs", nargs="+", metavar="DIR")
    m.add_argument("--output", required=True, metavar="OUT")
    return parser


def _read_options(a: argparse.Namespace) -> ReadOptions:
    from .readers import ReadOptions

    return ReadOptions(text_key=a.text_key, strip_gutenberg=a.strip_gutenberg, max_doc_bytes=a.max_doc_bytes,
                       titles=a.titles)


def _summary(m: dict) -> str:
    lines = []
    for s, t in m["totals"].items():
        lines.append(f"  {s:5s}: {t['shards']} shard(s), {t['documents']:,} documents, {t['tokens']:,} tokens")
    r = m["records"]
    lines.append(f"  records read {r['read']:,} = written {r['written']:,} + skipped {r['skipped']:,}")
    dups = m.get("duplicate_examples", {})
    for reason, n in m["skipped"].items():
        if reason in dups:
            ex = ", ".join(f"{d['loc']} = {d['kept']}" for d in dups[reason][:3])
        else:
            ex = ", ".join(m["skip_examples"].get(reason, [])[:3])
        lines.append(f"    skipped {reason}: {n:,}  (e.g. {ex})")
    return "\n".join(lines)


def _train_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer

    if args.tokenizer_type == "hf-bpe":
        from .hf_tokenizer import TRAINING_RECORD, train_hf_bpe

        path = train_hf_bpe(
            args.input, args.output, vocab_size=args.vocab_size, seed=args.seed,
            sample_sentences_max=args.sample_sentences, sample_bytes_max=args.sample_bytes,
            user_symbols=args.user_symbols, pad=args.pad, min_frequency=args.min_frequency,
            read_opts=_read_options(args), fmt=args.format, wiki_indexes=args.wiki_index or (),
        )
        meta = json.loads((path.parent / TRAINING_RECORD).read_text())
        print(f"wrote {path} (vocab {meta['vocab_size']}, sha256 {meta['sha256'][:16]}..., "
              f"{meta['sample']['lines_sampled']:,} sampled lines of {meta['sample']['lines_seen']:,})")
        return 0
    path = train_tokenizer(
        args.input, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
        seed=args.seed, sample_sentences_max=args.sample_sentences, sample_bytes_max=args.sample_bytes,
        user_symbols=args.user_symbols, pad=args.pad, character_coverage=args.character_coverage,
        num_threads=args.threads, read_opts=_read_options(args), fmt=args.format,
        wiki_indexes=args.wiki_index or (),
    )
    meta = json.loads((path.parent / "tokenizer.json").read_text())
    print(f"wrote {path} (vocab {args.vocab_size}, sha256 {meta['sha256'][:16]}..., "
          f"{meta['sample']['lines_sampled']:,} sampled lines of {meta['sample']['lines_seen']:,})")
    return 0


def _filters(spec: str) -> tuple[str, ...]:
    from lmforge.common.errors import InputError

    from .preprocess.quality import parse_rules

    try:
        return parse_rules(spec)
    except ValueError as e:
        raise InputError(f"--filter: {e}") from None


def _dedup_settings(args: argparse.Namespace) -> dict:
    from lmforge.common.errors import InputError

    from .preprocess.dedup import lsh_params, parse_modes

    try:
        modes = parse_modes(args.dedup)
    except ValueError as e:
        raise InputError(f"--dedup: {e}") from None
    if args.minhash_ngram < 1:
        raise InputError(f"--minhash-ngram must be at least 1, not {args.minhash_ngram}")
    d = {"dedup": modes, "minhash_ngram": args.minhash_ngram}
    if args.minhash_threshold is not None:
        d["minhash_bands"], d["minhash_rows"] = lsh_params(args.minhash_threshold, args.minhash_perm)
    return d


def _preprocess(args: argparse.Namespace) -> int:
    from .preprocess import RunOptions, Settings, preprocess

    settings = Settings(
        text_key=args.text_key, format=args.format, strip_gutenberg=args.strip_gutenberg,
        keep_empty=args.keep_empty, max_doc_bytes=args.max_doc_bytes, titles=args.titles, append_eod=args.append_eod,
        eod_token=args.eod_token,
        valid_fraction=args.valid_fraction, max_shard_bytes=args.max_shard_bytes,
        unit_bytes=args.unit_bytes, filters=_filters(args.filters), min_tokens=args.min_tokens,
        **_dedup_settings(args),
    )
    run = RunOptions(workers=max(1, args.workers), threads_per_worker=args.threads_per_worker,
                     batch_chars=args.batch_chars, on_error=args.on_error, overwrite=args.overwrite,
                     progress=args.progress, fingerprint=args.fingerprint, backend=args.backend,
                     wiki_indexes=tuple(args.wiki_index or ()))
    m = preprocess(args.input, args.tokenizer, args.output, settings, run)
    if m is not None:
        st = m["_run"]
        rate = st["tokens_processed"] / max(st["seconds"], 1e-9)
        print(f"wrote {os.path.join(args.output, 'manifest.json')}\n{_summary(m)}\n"
              f"  this run: {st['tokens_processed']:,} tokens in {st['seconds']:.1f}s "
              f"({rate / 1e6:.2f} M tokens/s, {st['ranks']} rank(s) x {st['workers_per_rank']} workers)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .tools import inspect

    print(inspect(args.output, samples=args.samples, chars=args.chars))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .tools import verify

    problems = verify(args.output)
    if problems:  # a check that failed, not bad input: exit 1
        print("\n".join(problems), file=sys.stderr)
        print(f"verify: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_FAILED
    print(f"verify: OK ({args.output})")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .tools import merge

    m = merge(args.inputs, args.output)
    print(f"merged {len(args.inputs)} outputs into {args.output}\n{_summary(m)}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train-tokenizer": _train_tokenizer,
    "preprocess": _preprocess,
    "inspect": _inspect,
    "verify": _verify,
    "merge": _merge,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = run_cli(lambda: COMMANDS[args.command](args), prog="python -m lmforge.data_pipeline")
    if code:
        from lmforge.common.launch_env import mpi_launched, mpi_world

        if mpi_launched() and mpi_world().size > 1:
            # This rank failed and has said why; the others may be waiting in a collective it will never
            # enter (the dedup exchange, a gather): end the whole job now rather than leave them hanging.
            mpi_world().abort(code)
    return code
