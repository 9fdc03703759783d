"""The ``tinyclip`` command line (also ``python -m tinyclip``).

One argparse parser with a subcommand per job: ``info`` reports the
installation and the devices it can see; ``zeroshot`` classifies images
against label prompts with a saved or Hugging Face model; ``embed`` writes
normalised image and text embeddings to an .npz file; ``train`` runs
``tinyclip.train`` (a flag for each main TrainConfig field); ``eval`` scores a
saved model on the held-out shapes sets. ``main``
returns an exit code instead of exiting, so that tests and other Python
code can call it.
"""

import argparse
import os
import platform
import sys

import numpy

from . import __version__, backend


def _cpu_count():
    """CPUs this process may run on (the affinity mask where the OS has one), and all the machine has."""
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity masks
        usable = total
    return usable, total


def _gpu_description():
    """'yes (count; name)' when CuPy sees a CUDA device, else 'no (why)'."""
    try:
        cupy = backend.cupy_module()
    except RuntimeError as error:
        return f"no ({error})"
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = properties["name"]
    name = name.decode() if isinstance(name, bytes) else name
    count = cupy.cuda.runtime.getDeviceCount()
    return f"yes ({count} device{'s' if count != 1 else ''}; using {name})"


def run_info(args):
    """Print what tinyclip runs on: versions, the default backend, GPU and CPUs."""
    status = 0
    print(f"tinyclip  {__version__}")
    print(f"python    {platform.python_version()} ({platform.python_implementation()}, {sys.executable})")
    print(f"numpy     {numpy.__version__}")
    try:
        default = backend.default_backend()
    except ValueError as error:  # a bad TINYCLIP_BACKEND: say so, but still report the rest
        print(f"backend   invalid: {error}")
        status = 1
    else:
        source = "TINYCLIP_BACKEND" if os.environ.get("TINYCLIP_BACKEND", "").strip() else "built-in default"
        print(f"backend   {default} (from {source})")
    print(f"gpu       {_gpu_description()}")
    usable, total = _cpu_count()
    print(f"cpus      {usable} usable of {total}")
    return status


TOKENIZER_FILES = ("tokenizer.tinyclip.json", "merges.txt", "bpe_simple_vocab_16e6.txt.gz")


class CommandError(Exception):
    """A problem with the command's inputs: printed as one line, exit code 2."""


def _load_tokenizer(model_dir, bpe):
    """The tokenizer given by --bpe, or the first of TOKENIZER_FILES in the model's folder."""
    from .tokenizer import Tokenizer
    candidates = [bpe] if bpe else [os.path.join(model_dir, name) for name in TOKENIZER_FILES]
    for path in candidates:
        if os.path.isfile(path):
            return Tokenizer.load(path) if path.endswith(".json") else Tokenizer.from_bpe_file(path)
    if bpe:
        raise CommandError(f"--bpe {bpe}: no such file")
    raise CommandError(f"no tokenizer in {model_dir} (looked for {', '.join(TOKENIZER_FILES)}): give --bpe PATH, "
                       "CLIP's bpe_simple_vocab_16e6.txt.gz or a tokenizer saved by tinyclip")


def _prompt_template(template):
    """An argparse type: ``template`` itself when it has exactly one ``{}`` (evaluate.check_template)."""
    from .evaluate import check_template
    try:
        return check_template(template)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _load_model_and_images(args):
    from . import checkpoint
    from .data import preprocess_batch
    model = checkpoint.from_pretrained(args.model)
    model.eval()
    images = preprocess_batch(args.images, model.config.image_size, model.config.image_normalization) if args.images else None
    return model, images


def _logits(model, image_emb, text_emb):
    """Scaled cosine similarities (+ bias for SigLIP), as the model was trained to read them: (images, texts)."""
    logits = numpy.exp(float(model.log_scale.item())) * (image_emb @ text_emb.T)
    return logits + float(model.bias.item()) if model.bias is not None else logits


def run_zeroshot(args):
    """Score every image against every label (its prompts ensembled) and print the best labels."""
    from . import evaluate
    model, images = _load_model_and_images(args)
    tokenizer = _load_tokenizer(args.model, args.bpe)
    templates = args.template or evaluate.DEFAULT_TEMPLATES
    # each label's prompts are encoded, normalised and averaged into one class embedding (CLIP §3.1.4)
    class_emb = backend.to_numpy(evaluate.encode_classes(model, tokenizer, args.labels, templates))  # (labels, D)
    image_emb = backend.to_numpy(evaluate.encode_images(model, images))                             # (images, D)
    logits = _logits(model, image_emb, class_emb)                              # (images, labels)
    if model.config.family == "clip":   # a softmax over the labels: which one fits best
        scores = numpy.exp(logits - logits.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
    else:                                # SigLIP: each label's own probability of matching
        scores = 1 / (1 + numpy.exp(-logits))
    top = min(args.top, len(args.labels))
    for path, row in zip(args.images, scores):
        ranked = numpy.argsort(-row)[:top]
        print(f"{path}: " + ", ".join(f"{args.labels[i]} {row[i]:.3f}" for i in ranked))
    return 0


def run_embed(args):
    """Write normalised embeddings of the images and/or texts to an .npz file."""
    from . import autograd
    if not args.images and not args.texts:
        raise CommandError("give --images and/or --texts to embed")
    model, images = _load_model_and_images(args)
    arrays = {}
    with autograd.no_grad():
        if images is not None:
            arrays["image_emb"] = model.encode_image(images).numpy()
        if args.texts:
            tokens = _load_tokenizer(args.model, args.bpe)(args.texts, context_length=model.config.context_length)
            arrays["text_emb"] = model.encode_text(tokens).numpy()
    numpy.savez(args.out, **arrays)
    print(f"wrote {', '.join(f'{name} {array.shape}' for name, array in arrays.items())} to {args.out}")
    return 0


def run_train(args):
    """Train a model (train.TrainConfig from the flags); exit code 1 when the loss diverged."""
    from . import train
    fields = {field.name for field in train.dataclasses.fields(train.TrainConfig)}
    values = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    if args.image_size is not None:
        values["model_overrides"] = {"image_size": args.image_size}
    config = train.TrainConfig(**values)
    try:
        train.train(config, resume=args.resume)
    except train.NonFiniteLoss as error:
        print(f"tinyclip train: {error}", file=sys.stderr)
        return 1
    return 0


def run_eval(args):
    """Evaluate a saved model on the held-out shapes sets and print the metrics as JSON."""
    import json
    from . import evaluate, train
    from .checkpoint import from_pretrained
    model = from_pretrained(args.model)
    tokenizer = _load_tokenizer(args.model, args.bpe)
    config = train.TrainConfig(eval_per_class=args.eval_per_class, eval_pairs=args.eval_pairs)
    metrics = evaluate.evaluate(model, tokenizer, **train.evaluation_sets(config, model.config.image_size))
    print(json.dumps(metrics, indent=2))
    return 0


def _add_train_arguments(parser):
    from .train import TrainConfig
    defaults = TrainConfig()
    add = parser.add_argument
    add("--preset", default=defaults.preset, help="model preset (tinyclip.models.PRESETS)")
    add("--image-size", type=int, help="image side in pixels (default: the preset's)")
    add("--loss", choices=("siglip", "clip"), default=defaults.loss, help="sigmoid (SigLIP) or softmax (CLIP) loss")
    add("--clip-method", choices=("ring", "gather"), default=defaults.clip_method,
        help="how the CLIP loss runs over MPI ranks")
    add("--steps", type=int, default=defaults.steps, help="optimiser steps")
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch size over all ranks")
    add("--lr", type=float, default=defaults.lr, help="peak learning rate")
    add("--min-lr", type=float, default=defaults.min_lr, help="learning rate at the end of the cosine")
    add("--warmup-steps", type=int, default=defaults.warmup_steps,
        help="linear warm-up steps (default: an eighth of --steps, at most 50)")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (matrices only)")
    add("--grad-clip", type=float, default=defaults.grad_clip, help="gradient-norm cap (0: none)")
    add("--seed", type=int, default=defaults.seed, help="initialisation and data-order seed")
    add("--dtype", default=defaults.dtype, help="parameter dtype")
    add("--image-tower", metavar="MODEL", help="start the image tower from this model folder (tinyclip's or a "
                                                "Hugging Face CLIP/SigLIP one); its tower's settings replace the preset's")
    add("--lock-image", action="store_true", help="LiT: keep the --image-tower fixed and train only the text side")
    add("--data", help="a CSV/TSV of image paths and captions, or a folder of images with .txt captions "
                       "(default: the built-in shapes)")
    add("--image-column", default=defaults.image_column, help="CSV/TSV column with image paths")
    add("--caption-column", default=defaults.caption_column, help="CSV/TSV column with captions")
    add("--strict", action="store_true", help="a missing or unreadable image is an error, not a warning")
    add("--examples", type=int, help="train on the first N examples only")
    add("--out", help="run folder (default: runs/<timestamp>, or the folder of --resume)")
    add("--resume", metavar="DIR", help="continue the run in DIR (a run folder or its checkpoint/)")
    add("--log-every", type=int, default=defaults.log_every, help="steps between progress lines")
    add("--eval-every", type=int, default=defaults.eval_every, help="steps between evaluations (0: at the end)")
    add("--checkpoint-every", type=int, default=defaults.checkpoint_every,
        help="steps between checkpoints (0: at the end and on Ctrl-C)")
    add("--eval-per-class", type=int, default=defaults.eval_per_class, help="zero-shot images per class")
    add("--eval-pairs", type=int, default=defaults.eval_pairs, help="retrieval pairs and relation-probe images")
    add("--no-plots", dest="plots", action="store_false", help="skip loss.png and similarity.png")


def build_parser():
    from .evaluate import DEFAULT_TEMPLATES
    parser = argparse.ArgumentParser(
        prog="tinyclip",
        description="CLIP and SigLIP from scratch on NumPy (CPU) and CuPy (GPU).")
    parser.add_argument("--version", action="version", version=f"tinyclip {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="show versions, the default backend, GPU and CPUs",
                               description="Show the tinyclip and Python versions, the default backend, "
                                           "whether a GPU is usable, and the CPU count.")
    info.set_defaults(run=run_info)

    zeroshot = commands.add_parser("zeroshot", help="classify images against label prompts",
                                   description="Zero-shot classification: each label is written into every "
                                               "template, its prompts' embeddings are averaged into one "
                                               "label embedding, and each image is scored against every label.")
    zeroshot.add_argument("--model", required=True, help="a tinyclip checkpoint or Hugging Face CLIP/SigLIP folder")
    zeroshot.add_argument("--images", nargs="+", required=True, help="image files")
    zeroshot.add_argument("--labels", nargs="+", required=True, help="class names")
    zeroshot.add_argument("--template", action="append", type=_prompt_template, metavar="TEMPLATE",
                          help="prompt with one {} for the label; repeat it to ensemble several prompts per label "
                               f"(default: {' '.join(map(repr, DEFAULT_TEMPLATES))})")
    zeroshot.add_argument("--top", type=int, default=5, help="labels to show per image")
    zeroshot.add_argument("--bpe", help="tokenizer file (default: looked up in the model folder)")
    zeroshot.set_defaults(run=run_zeroshot)

    embed = commands.add_parser("embed", help="write normalised embeddings to an .npz file",
                                description="Encode images and/or texts and save the unit-length "
                                            "embeddings (image_emb, text_emb) with numpy.savez.")
    embed.add_argument("--model", required=True, help="a tinyclip checkpoint or Hugging Face CLIP/SigLIP folder")
    embed.add_argument("--images", nargs="*", default=[], help="image files")
    embed.add_argument("--texts", nargs="*", default=[], help="texts")
    embed.add_argument("--out", required=True, help="the .npz file to write")
    embed.add_argument("--bpe", help="tokenizer file (default: looked up in the model folder)")
    embed.set_defaults(run=run_embed)

    train = commands.add_parser("train", help="train a CLIP/SigLIP model (default: the shapes preset on shapes)",
                                description="Train with the SigLIP or CLIP loss; under mpiexec, data-parallel. "
                                            "Writes metrics.jsonl, checkpoints, the model, summary.json and "
                                            "pictures into the run folder.")
    _add_train_arguments(train)
    train.set_defaults(run=run_train)

    evaluation = commands.add_parser("eval", help="evaluate a model on the held-out shapes sets",
                                     description="Zero-shot top-1/top-5 over the colour x shape classes, "
                                                 "image-text retrieval and the relation probe.")
    evaluation.add_argument("--model", required=True, help="a tinyclip model folder (e.g. RUN/model)")
    evaluation.add_argument("--bpe", help="tokenizer file (default: looked up in the model folder)")
    evaluation.add_argument("--eval-per-class", type=int, default=10, help="zero-shot images per class")
    evaluation.add_argument("--eval-pairs", type=int, default=500, help="retrieval pairs and probe images")
    evaluation.set_defaults(run=run_eval)
    return parser


def main(argv=None):
    """Run the command line on ``argv`` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors: argparse has already printed
        return int(stop.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    backend.tune_malloc()   # process-wide, so the command asks for it (importing tinyclip never does)
    try:
        return args.run(args)
    except (CommandError, ValueError, OSError) as error:   # bad files or inputs: their messages name them
        print(f"tinyclip {args.command}: {error}", file=sys.stderr)
        return 2
