"""Regenerate the small Hugging Face MoE checkpoint the default job fine-tunes
(``ds_hexamoe/data/checkpoints/mixtral-tiny``).

It is made by the package's own pre-training recipe, ``recipes/mixtral-tiny.json`` (a tiny Mixtral
trained from scratch for 200 steps on the shipped corpus, 2 CPU ranks, with a byte-level BPE tokenizer
trained on that corpus), whose Hugging Face export (``save_pretrained``: config, safetensors weights,
tokenizer) is copied into the package. About a minute on 2 CPU cores; about 1.2 MB.

    python scripts/make_default_checkpoint.py [--out ds_hexamoe/data/checkpoints/mixtral-tiny]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "ds_hexamoe", "data", "checkpoints", "mixtral-tiny"))
    ap.add_argument("--recipe", default=os.path.join(REPO, "recipes", "mixtral-tiny.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hexamoe-ckpt-") as tmp:
        run = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "ds_hexamoe", "train", args.recipe, "--output-dir", run]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=tmp)
        hf = os.path.join(run, "hf")
        os.makedirs(args.out, exist_ok=True)
        for name in FILES:
            dst = os.path.join(args.out, name)
            shutil.copyfile(os.path.join(hf, name), dst)
            os.chmod(dst, 0o644)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in FILES)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB: {', '.join(FILES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
