"""The ``tinyclip`` command line (also ``python -m tinyclip``).

One argparse parser with a subcommand per job: ``info`` reports the
installation and the devices it can see; ``zeroshot`` classifies images
against label prompts with a saved or Hugging Face model; ``embed`` writes
normalised image and text embeddings to an .npz file; ``train`` runs
``tinyclip.train`` (a flag for each main TrainConfig field); ``eval`` scores a
saved model on the held-out shapes sets; ``export`` writes a model as a
Hugging Face folder (``tinyclip.hub``). ``main`` returns an exit code instead of exiting, so that tests and other Python
code can call it.
"""

import argparse
import json
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


class CommandError(Exception):
    """A problem with the command's inputs: printed as one line, exit code 2."""


def _load_tokenizer(model_dir, bpe):
    """The tokenizer given by --bpe, or the one saved in the model's folder (tokenizer.find_tokenizer)."""
    from .tokenizer import TOKENIZER_FILES, find_tokenizer, load_tokenizer
    if bpe:
        if not os.path.isfile(bpe):
            raise CommandError(f"--bpe {bpe}: no such file")
        return load_tokenizer(bpe)
    tokenizer = find_tokenizer(model_dir)
    if tokenizer is None:
        raise CommandError(f"no tokenizer in {model_dir} (looked for {', '.join(TOKENIZER_FILES)}): give --bpe "
                           "PATH, CLIP's bpe_simple_vocab_16e6.txt.gz, SigLIP's spiece.model or a tokenizer saved "
                           "by tinyclip")
    return tokenizer


def _prompt_template(template):
    """An argparse type: ``template`` itself when it has exactly one ``{}`` (evaluate.check_template)."""
    from .evaluate import check_template
    try:
        return check_template(template)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _load_model_and_images(args):
    from . import hub
    from .data import preprocess_batch
    model = hub.load_model(args.model, image_size=args.image_size)
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
    method = "softmax over the labels" if model.config.family == "clip" else "sigmoid per label"
    if args.json:   # every label's full-precision score, for scripts
        print(json.dumps({"scores": method.split()[0], "labels": list(args.labels),
                          "images": {path: dict(zip(args.labels, map(float, row)))
                                     for path, row in zip(args.images, scores)}}, indent=2))
        return 0
    print(f"scores: {method} ({model.config.family})", file=sys.stderr)
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
    if args.json:
        print(json.dumps({"out": os.path.abspath(args.out),
                          "arrays": {name: list(array.shape) for name, array in arrays.items()}}))
    else:
        print(f"wrote {', '.join(f'{name} {array.shape}' for name, array in arrays.items())} to {args.out}")
    return 0


def run_export(args):
    """Write a model and its tokenizer in another library's layout (``--format hf``: transformers)."""
    from . import hub
    model = hub.load_model(args.model)
    tokenizer = _load_tokenizer(args.model, args.bpe)
    for note in hub.export_hf(model, tokenizer, args.out):
        print(note)
    print(f"wrote {args.out}: config.json, model.safetensors, preprocessor_config.json and the tokenizer's files")
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
    """Evaluate a saved model: on your captions (--data), your classes (--classes), or the held-out shapes sets."""
    import json
    from . import evaluate
    from .hub import load_model
    model = load_model(args.model)
    tokenizer = _load_tokenizer(args.model, args.bpe)
    if args.data is None and args.classes is None:
        if args.linear_probe:
            raise CommandError("--linear-probe needs --classes DIR (a folder of one sub-folder per class)")
        from . import train
        config = train.TrainConfig(eval_per_class=args.eval_per_class, eval_pairs=args.eval_pairs)
        metrics = evaluate.evaluate(model, tokenizer, **train.evaluation_sets(config, model.config.image_size))
        print(json.dumps(metrics, indent=2))
        return 0
    results = {}
    if args.data is not None:
        results["retrieval"] = _eval_retrieval(args, model, tokenizer)
    if args.classes is not None:
        results.update(_eval_classes(args, model, tokenizer))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(_eval_table(results))
    return 0


def _eval_retrieval(args, model, tokenizer):
    """Recall@1/5/10 both ways on the pairs of --data, captions grouped by image path."""
    from . import evaluate
    from .data import captions, shards
    if shards.is_shard_pattern(args.data):
        pairs = shards.ShardCaptions(args.data, strict=True)
    elif os.path.isdir(args.data):
        pairs = captions.FolderCaptions(args.data, strict=True)
    else:
        pairs = captions.CSVCaptions(args.data, image_column=args.image_column, caption_column=args.caption_column,
                                     strict=True)
    metrics, _ = evaluate.caption_retrieval(model, tokenizer, pairs, batch_size=args.batch_size)
    return {"data": args.data, **metrics}


def _eval_classes(args, model, tokenizer):
    """Zero-shot (and with --linear-probe a linear probe) on the class folders of --classes."""
    from . import evaluate, plots
    from .data.classes import ImageClasses
    classes = ImageClasses(args.classes)
    templates = evaluate.resolve_templates(args.template, args.templates)
    report, image_emb = evaluate.class_folder_zeroshot(model, tokenizer, classes, templates, args.batch_size)
    confusion = report.pop("confusion")
    zeroshot = {"data": args.classes, "templates": len(templates), **report}
    if args.plots and args.confusion:
        if plots.available():
            plots.plot_confusion(confusion, classes.class_names, args.confusion)
            zeroshot["confusion_picture"] = args.confusion
        else:
            print(f"warning: no confusion picture: {plots.MISSING_MATPLOTLIB}", file=sys.stderr)
    results = {"zeroshot": zeroshot}
    if args.linear_probe:
        train_rows, test_rows = classes.split(args.probe_test_fraction)
        accuracy, fit = evaluate.linear_probe(image_emb[train_rows], classes.labels[train_rows],
                                              image_emb[test_rows], classes.labels[test_rows],
                                              len(classes.class_names), regularization=args.probe_c)
        results["linear_probe"] = {"accuracy": accuracy, "fit": fit, "train_images": len(train_rows),
                                   "test_images": len(test_rows), "C": args.probe_c}
    return results


def _eval_table(results):
    """The results of run_eval as a few readable lines."""
    lines = []
    if "retrieval" in results:
        retrieval = results["retrieval"]
        ks = [key.rsplit("@", 1)[1] for key in retrieval if key.startswith("image_to_text_recall@")]
        lines.append(f"retrieval on {retrieval['data']}: {retrieval['images']} images, "
                     f"{retrieval['captions']} captions")
        lines.append(" " * 14 + "".join(f"{'recall@' + k:>11}" for k in ks))
        for direction, name in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            lines.append(f"{name:<14}" + "".join(f"{retrieval[f'{direction}_recall@{k}']:>11.4f}" for k in ks))
    if "zeroshot" in results:
        zeroshot = results["zeroshot"]
        lines.append(f"zero-shot on {zeroshot['data']}: {zeroshot['classes']} classes, {zeroshot['images']} images, "
                     f"{zeroshot['templates']} template{'s' if zeroshot['templates'] != 1 else ''}")
        lines.append("  ".join(f"top-{key[3:]} {value:.4f}" for key, value in zeroshot.items()
                               if key.startswith("top")))
        width = max(map(len, zeroshot["per_class"]))
        lines += [f"  {name:<{width}}  {accuracy:.4f}" for name, accuracy in zeroshot["per_class"].items()]
        if "confusion_picture" in zeroshot:
            lines.append(f"confusion matrix: {zeroshot['confusion_picture']}")
    if "linear_probe" in results:
        probe = results["linear_probe"]
        lines.append(f"linear probe ({probe['fit']}, C={probe['C']}, {probe['train_images']} train / "
                     f"{probe['test_images']} test images): accuracy {probe['accuracy']:.4f}")
    return "\n".join(lines)


def _add_train_arguments(parser):
    from .train import TrainConfig
    defaults = TrainConfig()
    add = parser.add_argument
    add("--preset", default=defaults.preset, help="model preset (tinyclip.models.PRESETS)")
    add("--image-size", type=int, help="image side in pixels (default: the preset's)")
    add("--loss", choices=("siglip", "clip"), default=defaults.loss,
        help="sigmoid (SigLIP) or softmax (CLIP) loss (default: the --init model's family, else siglip)")
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
    add("--lock-image", action="store_true",
        help="LiT: keep the --image-tower (or --init) image tower fixed and train only the text side")
    # fine-tuning a whole pretrained model
    add("--init", metavar="MODEL", help="start both towers, the scale and the bias from this model folder (tinyclip, "
                                        "Hugging Face CLIP/SigLIP or open_clip) and use its tokenizer")
    add("--lock-text", action="store_true", help="keep the --init model's text tower (projection included) fixed")
    add("--data", help="a CSV/TSV of image paths and captions, a folder of images with .txt captions, or "
                       "webdataset tar shards ('shards/train-{000000..000099}.tar') (default: the built-in shapes)")
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
    # validation and loading (issue 17)
    add("--val-data", help="held-out pairs (CSV/TSV, folder or shards) evaluated every --eval-every steps")
    add("--val-fraction", type=float, default=defaults.val_fraction,
        help="hold out this fraction of --data's images (always the same ones) to validate on")
    add("--workers", type=int, default=defaults.workers, help="loader processes decoding images (1: one thread)")


def _add_output_arguments(parser, json_help):
    """--json and --image-size, shared by zeroshot and embed."""
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="run a ViT at N x N pixels: its position embeddings are resized bicubically to "
                             "the new patch grid (default: the model's own size)")


def build_parser():
    from .evaluate import DEFAULT_TEMPLATES, TEMPLATE_SETS
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
    zeroshot.add_argument("--model", required=True,
                          help="a tinyclip, Hugging Face CLIP/SigLIP or open_clip model folder")
    zeroshot.add_argument("--images", nargs="+", required=True, help="image files")
    zeroshot.add_argument("--labels", nargs="+", required=True, help="class names")
    zeroshot.add_argument("--template", action="append", type=_prompt_template, metavar="TEMPLATE",
                          help="prompt with one {} for the label; repeat it to ensemble several prompts per label "
                               f"(default: {' '.join(map(repr, DEFAULT_TEMPLATES))})")
    zeroshot.add_argument("--top", type=int, default=5, help="labels to show per image")
    zeroshot.add_argument("--bpe", help="tokenizer file (default: looked up in the model folder)")
    _add_output_arguments(zeroshot, "print every label's full-precision score per image as JSON")
    zeroshot.set_defaults(run=run_zeroshot)

    embed = commands.add_parser("embed", help="write normalised embeddings to an .npz file",
                                description="Encode images and/or texts and save the unit-length "
                                            "embeddings (image_emb, text_emb) with numpy.savez.")
    embed.add_argument("--model", required=True,
                       help="a tinyclip, Hugging Face CLIP/SigLIP or open_clip model folder")
    embed.add_argument("--images", nargs="*", default=[], help="image files")
    embed.add_argument("--texts", nargs="*", default=[], help="texts")
    embed.add_argument("--out", required=True, help="the .npz file to write")
    embed.add_argument("--bpe", help="tokenizer file (default: looked up in the model folder)")
    _add_output_arguments(embed, "print the written file's path and the arrays' shapes as JSON")
    embed.set_defaults(run=run_embed)

    export = commands.add_parser("export", help="write a model as a Hugging Face CLIPModel/SiglipModel folder",
                                 description="Write the model with its tokenizer and image-processor settings in "
                                             "a layout another library loads; transformers' CLIPModel / "
                                             "SiglipModel.from_pretrained and AutoProcessor read --format hf.")
    export.add_argument("--model", required=True,
                        help="a tinyclip, Hugging Face CLIP/SigLIP or open_clip model folder")
    export.add_argument("--format", choices=("hf",), default="hf", help="the layout to write (hf: transformers)")
    export.add_argument("--out", required=True, help="the folder to write (replaced whole, atomically)")
    export.add_argument("--bpe", help="tokenizer file (default: looked up in the model folder)")
    export.set_defaults(run=run_export)

    train = commands.add_parser("train", help="train a CLIP/SigLIP model (default: the shapes preset on shapes)",
                                description="Train with the SigLIP or CLIP loss; under mpiexec, data-parallel. "
                                            "Writes metrics.jsonl, checkpoints, the model, summary.json and "
                                            "pictures into the run folder.")
    _add_train_arguments(train)
    train.set_defaults(run=run_train)

    evaluation = commands.add_parser(
        "eval", help="evaluate a model on your captions or classes (default: the held-out shapes sets)",
        description="Retrieval recall@1/5/10 both ways on image-caption pairs (--data), zero-shot top-1/top-5 "
                    "with per-class accuracy and a confusion matrix on a folder of class folders (--classes), "
                    "a linear probe (--linear-probe); without --data or --classes, the shapes sets as JSON.")
    evaluation.add_argument("--model", required=True, help="a tinyclip model folder (e.g. RUN/model)")
    evaluation.add_argument("--bpe", help="tokenizer file (default: looked up in the model folder)")
    evaluation.add_argument("--eval-per-class", type=int, default=10, help="shapes: zero-shot images per class")
    evaluation.add_argument("--eval-pairs", type=int, default=500, help="shapes: retrieval pairs and probe images")
    evaluation.add_argument("--data", help="image-caption pairs: a CSV/TSV file, a folder of images with .txt "
                                           "captions, or tar shards; rows with the same image path are one image")
    evaluation.add_argument("--image-column", default="filepath", help="CSV/TSV column with image paths")
    evaluation.add_argument("--caption-column", default="title", help="CSV/TSV column with captions")
    evaluation.add_argument("--classes", metavar="DIR", help="a folder with one sub-folder of images per class "
                                                             "(names: the folder names, or DIR/classnames.txt)")
    evaluation.add_argument("--template", action="append", type=_prompt_template, metavar="TEMPLATE",
                            help="zero-shot prompt with one {} for the class name; repeat to ensemble "
                                 f"(default: {' '.join(map(repr, DEFAULT_TEMPLATES))})")
    evaluation.add_argument("--templates", choices=sorted(TEMPLATE_SETS),
                            help="a built-in prompt set (imagenet: the CLIP paper's 80 ImageNet prompts)")
    evaluation.add_argument("--confusion", default="confusion.png", metavar="PNG",
                            help="where --classes draws its confusion matrix")
    evaluation.add_argument("--no-plots", dest="plots", action="store_false", help="draw no confusion matrix")
    evaluation.add_argument("--linear-probe", action="store_true",
                            help="also fit a logistic regression on the image embeddings of a train split of "
                                 "--classes and report its test accuracy (scikit-learn when installed)")
    evaluation.add_argument("--probe-test-fraction", type=float, default=0.5,
                            help="the share of each class held out to test the linear probe")
    evaluation.add_argument("--probe-c", type=float, default=1.0, help="the linear probe's inverse L2 strength C")
    evaluation.add_argument("--batch-size", type=int, default=64, help="images and texts encoded at a time")
    evaluation.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
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
    try:
        return args.run(args)
    except (CommandError, ValueError, OSError) as error:   # bad files or inputs: their messages name them
        print(f"tinyclip {args.command}: {error}", file=sys.stderr)
        return 2
