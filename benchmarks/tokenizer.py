"""How long the CLIP tokenizer takes over 10,000 short captions on one core, and how long training a vocabulary takes.

The captions are synthetic but varied: a few thousand made-up words, colours,
numbers, punctuation, contractions, accented letters, emoji and the odd HTML
entity, 4 to 16 words each, drawn from a seeded generator. A vocabulary is
trained on them (``Tokenizer.train``, timed once), then ``tok(captions)``
(clean, pre-tokenise, BPE, pad to 77) is timed two ways: cold, a fresh
tokenizer whose word cache starts empty, and warm, the same tokenizer again
with its cache filled. The process is pinned to one core where the platform
allows it. The median over ``--repeat`` rounds after ``--warmup`` rounds is
printed with the machine it ran on.

    python benchmarks/tokenizer.py
    python benchmarks/tokenizer.py --captions 10000 --vocab-size 4096 --repeat 5

Target (issue 4): tokenising 10,000 short captions in under one second on one core.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout, uninstalled
from benchmarks.common import machine_description, timed  # noqa: E402
from tinyclip import tokenizer  # noqa: E402
from tinyclip import backend  # noqa: E402
from tinyclip.backend import backend_module  # noqa: E402

TARGET_CAPTIONS, TARGET_SECONDS = 10_000, 1.0
SYLLABLES = ["ka", "lo", "mi", "ter", "san", "dor", "vel", "qui", "bra", "sto", "ne", "ph", "ou", "zy", "an", "ish"]
COLOURS = ["red", "blue", "green", "dark", "bright", "golden", "Pale", "BLACK"]
EXTRAS = ["café", "naïve", "über", "Ærøskøbing", "😀", "🐶", "&amp;", "don't", "it's", "we'll", "3.5", "1920s",
          "(left)", "--", "...", "!", "?", "東京", "日本の犬"]


def synthetic_captions(count, seed=0, lexicon_size=3000):
    """``count`` captions of 4 to 16 words: made-up words, colours, numbers and the odd extra (see the docstring)."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(lexicon_size)]
    captions = []
    for _ in range(count):
        words = []
        for _ in range(rng.randint(4, 16)):
            roll = rng.random()
            if roll < 0.75:
                words.append(rng.choice(lexicon))
            elif roll < 0.85:
                words.append(rng.choice(COLOURS))
            elif roll < 0.9:
                words.append(str(rng.randint(0, 2030)))
            else:
                words.append(rng.choice(EXTRAS))
        caption = " ".join(words)
        captions.append(caption[0].upper() + caption[1:] + rng.choice([".", "", "  ", ", at night."]))
    return captions


def pin_to_one_core():
    """Run on one core (the first usable one); say which, or that the platform cannot pin."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=TARGET_CAPTIONS)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    backend.tune_malloc()   # as the tinyclip command and train() do: the figures are those of a real run

    pinning = pin_to_one_core()
    numpy = backend_module("numpy")
    print(machine_description(numpy, "numpy"))
    print(f"{pinning}; ftfy: {'installed' if tokenizer.ftfy is not None else 'not installed'}")
    captions = synthetic_captions(args.captions)

    start = time.perf_counter()
    trained = tokenizer.Tokenizer.train(captions, args.vocab_size)
    train_seconds = time.perf_counter() - start
    print(f"train: {trained.vocab_size} ids ({len(trained.merges)} merges) from {len(captions)} captions "
          f"in {train_seconds:.2f} s")

    def cold():
        tokenizer.Tokenizer(trained.merges)(captions, args.context_length)

    def warm():
        trained(captions, args.context_length)

    cold_seconds, warm_seconds = timed([cold, warm], numpy, args.repeat, args.warmup)
    tokens = trained(captions, args.context_length)
    per_caption = (tokens != 0).sum(axis=1).mean()
    print(f"tokenise {len(captions)} captions (mean {per_caption:.1f} ids each, context {args.context_length}):")
    for name, seconds in (("cold cache", cold_seconds), ("warm cache", warm_seconds)):
        verdict = ""
        if len(captions) == TARGET_CAPTIONS:
            verdict = "  (target < 1 s: " + ("met" if seconds < TARGET_SECONDS else "MISSED") + ")"
        print(f"  {name}: {seconds:.3f} s, {seconds / len(captions) * 1e6:.1f} µs per caption{verdict}")


if __name__ == "__main__":
    main()
