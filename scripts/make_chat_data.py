"""Writes the shipped synthetic chat data, ``ds_hexamoe/data/chat/{train,validation}.jsonl``: short
instruction/response pairs (arithmetic, reversing, capitals, counting letters; some with a system message,
some with a follow-up turn) in the "chat" format of recipes/mixtral-tiny-sft.json. Seeded: running it again
gives the same files.

    python scripts/make_chat_data.py [--train 400] [--validation 40] [--out FOLDER]
"""
from __future__ import annotations

import argparse
import json
import os
import random

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_hexamoe", "data", "chat")
WORDS = ("apple banana cherry garden river stone cloud forest yellow window silver rocket planet candle "
         "bridge orange summer winter pencil marble castle dragon violin butter tiger lemon market").split()
SYSTEM = "You are a careful assistant. Answer briefly."


def turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    a, b, w = rng.randrange(10, 90), rng.randrange(1, 10), rng.choice(WORDS)
    if kind == 0:
        return f"What is {a} + {b}?", str(a + b)
    if kind == 1:
        return f"What is {a} - {b}?", str(a - b)
    if kind == 2:
        return f"Reverse the word {w}.", w[::-1]
    if kind == 3:
        return f"Write {w} in capitals.", w.upper()
    return f"How many letters are in {w}?", str(len(w))


def record(rng: random.Random) -> dict:
    msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.25 else 1):
        q, a = turn(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def write(path: str, n: int, rng: random.Random) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps(record(rng)) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--validation", type=int, default=40)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(2026)
    write(os.path.join(args.out, "train.jsonl"), args.train, rng)
    write(os.path.join(args.out, "validation.jsonl"), args.validation, rng)
    print(f"wrote {args.train} + {args.validation} conversations to {args.out}")


if __name__ == "__main__":
    main()
