"""Generate a continuation with ``transformers`` from an exported Hugging Face directory.

    python -m lmforge.trainer.generate --model runs/demo/hf --prompt "The history of"
"""

from __future__ import annotations

import argparse
import os
import sys

from lmforge.common.errors import InputError, run_cli


def main(argv=None) -> int:
    return run_cli(lambda: _generate(argv), prog="generate")


def _generate(argv) -> int:
    ap = argparse.ArgumentParser(prog="lmforge.trainer.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="exported Hugging Face model directory")
    ap.add_argument("--prompt", default="The history of", help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(args.model):
        raise InputError(f"{args.model}: not a directory (an exported Hugging Face model)")
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = tok(args.prompt, return_tensors="pt")
    kw = dict(do_sample=args.temperature > 0, max_new_tokens=args.max_new_tokens,
              repetition_penalty=1.3, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    if args.temperature > 0:
        kw["temperature"] = args.temperature
    with torch.no_grad():
        out = model.generate(**ids, **kw)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
