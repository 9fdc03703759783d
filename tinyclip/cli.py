"""The ``tinyclip`` command line (also ``python -m tinyclip``).

One argparse parser with a subcommand per job: ``info`` reports the
installation and the devices it can see; ``zeroshot`` classifies images
against label prompts with a saved or Hugging Face model; ``embed`` writes
normalised image and text embeddings to an .npz file; ``train`` runs
``tinyclip.train`` (a flag for each TrainConfig field, made from the field
itself: its type, default, choices and the comment beside it); ``eval``
scores a saved model on your captions or classes, or on the held-out shapes sets;
``export`` writes a model as a Hugging Face folder (``tinyclip.hub``). ``main`` returns an exit
code instead of exiting, so that tests and other Python code can call it.

Exit codes (docs/faults.md): 0 finished (or nothing left to do); 1 failed
while training (the loss diverged, or an unexpected error, printed with its
traceback; under MPI it ends the whole job); 2 could not start or a file
could not be read or written (the message names it; under MPI, on any
rank, which ends the whole job), or a usage error; 75 (EX_TEMPFAIL)
interrupted by SIGINT/SIGTERM after saving a checkpoint: resume with
``tinyclip train --resume RUN``; 130 stopped at once by a second signal.
"""

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import platform
import sys
import textwrap
import tokenize
import types
import warnings

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


EXIT_FINISHED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_STOPPED_AT_ONCE = 0, 1, 2, 75, 130


class CommandError(Exception):
    """A problem with the command's inputs: printed as one line, exit code 2."""


def _hugging_face_model_type(model_dir):
    """The ``model_type`` of a Hugging Face model folder ("clip", "siglip", ...); None for tinyclip's own or unknown."""
    import json
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):          # no or unreadable config: loading the model reports it
        return None
    if not isinstance(config, dict) or "tinyclip_format" in config:
        return None
    return config.get("model_type")


def _require_model_folder(path):
    """CommandError for a --model that is not there (a preset name, say): said the same by every command."""
    from .hub import NO_SUCH_FOLDER
    if not os.path.exists(path):
        raise CommandError(f"--model {path}: {NO_SUCH_FOLDER}")


def _load_tokenizer(model_dir, bpe):
    """The tokenizer given by --bpe, or the one saved in the model's folder (tokenizer.find_tokenizer).

    Raises CommandError when there is none, naming the files looked for (for a
    Hugging Face SigLIP folder: its SentencePiece model, which CLIP's BPE
    cannot stand in for, having another vocabulary).
    """
    from .tokenizer import SPIECE_FILE, TOKENIZER_FILES, find_tokenizer, load_tokenizer
    _require_model_folder(model_dir)         # else it would be reported as a folder without a tokenizer
    if bpe:
        if _hugging_face_model_type(model_dir) == "siglip" and not bpe.endswith(".model"):
            raise CommandError(f"--bpe {bpe}: {model_dir} is a Hugging Face SigLIP model, whose tokenizer is "
                               f"SentencePiece ({SPIECE_FILE}); CLIP's BPE has another vocabulary")
        if not os.path.isfile(bpe):
            raise CommandError(f"--bpe {bpe}: no such file")
        return load_tokenizer(bpe)
    tokenizer = find_tokenizer(model_dir)
    if tokenizer is None and _hugging_face_model_type(model_dir) == "siglip":
        raise CommandError(f"{model_dir} is a Hugging Face SigLIP model without its tokenizer: copy {SPIECE_FILE} "
                           f"(SentencePiece) from the published model into it, or give --bpe PATH/{SPIECE_FILE}; "
                           f"CLIP's BPE has another vocabulary and cannot stand in for it")
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


def _positive_int(text):
    """An argparse type: an int >= 1 (a count of labels, images or pairs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _number(text):
    """``text`` as a float, or the argparse error that says it is not a number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive_number(text):
    """An argparse type: a finite float > 0 (the linear probe's C)."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value


def _open_fraction(text):
    """An argparse type: a float strictly between 0 and 1 (a share held out, leaving some on both sides)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1 (both excluded)")
    return value


IMAGE_BATCH = 64   # images read, preprocessed and encoded at a time: memory holds one batch, whatever the count


def _load_model(path, image_size=None):
    from . import hub
    _require_model_folder(path)
    model = hub.load_model(path, image_size=image_size)
    model.eval()
    return model


class _Progress:
    """Progress on stderr, a line such as "images 128/1000", only for inputs of more than one batch.

    A line about every tenth of the work and one at the end, so a log holds a
    dozen at most; whole lines, so they never garble zeroshot's results on stdout.
    """

    def __init__(self, total, what, batch_size, stream=None):
        self.total, self.what, self.done, self.shown = total, what, 0, 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = total > batch_size

    def update(self, count):
        self.done += count
        if self.enabled and (self.done >= self.total or self.done - self.shown >= self.total / 10):
            self.shown = self.done
            self.stream.write(f"{self.what} {self.done}/{self.total}\n")
            self.stream.flush()


def _image_embeddings(model, paths, batch_size=None):
    """(paths of the batch, their unit image embeddings (b, D) NumPy), one batch at a time, with progress."""
    from . import evaluate
    from .data import preprocess_batch
    batch_size = IMAGE_BATCH if batch_size is None else batch_size
    progress = _Progress(len(paths), "images", batch_size)
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        pixels = preprocess_batch(batch, model.config.image_size, model.config.image_normalization)   # (b, H, W, 3)
        yield batch, backend.to_numpy(evaluate.encode_images(model, pixels, batch_size=batch_size))
        progress.update(len(batch))


def _logits(model, image_emb, text_emb):
    """Scaled cosine similarities (+ bias for SigLIP), as the model was trained to read them: (images, texts)."""
    logits = numpy.exp(float(model.log_scale.item())) * (image_emb @ text_emb.T)
    return logits + float(model.bias.item()) if model.bias is not None else logits


def run_zeroshot(args):
    """Score every image against every label (its prompts ensembled) and print the best labels, batch by batch."""
    from . import evaluate
    repeated = sorted({label for label in args.labels if args.labels.count(label) > 1})
    if repeated:                                 # one class each: a repeat would be scored twice (once in --json)
        raise CommandError(f"--labels: {', '.join(map(repr, repeated))} given more than once")
    tokenizer = _load_tokenizer(args.model, args.bpe)     # first: a missing tokenizer fails before any work
    model = _load_model(args.model, args.image_size)
    templates = args.template or evaluate.DEFAULT_TEMPLATES
    # each label's prompts are encoded, normalised and averaged into one class embedding (CLIP §3.1.4)
    class_emb = backend.to_numpy(evaluate.encode_classes(model, tokenizer, args.labels, templates))  # (labels, D)
    method = "softmax over the labels" if model.config.family == "clip" else "sigmoid per label"
    print(f"scores: {method} ({model.config.family})", file=sys.stderr)
    every_score = {}                     # --json: every label's full-precision score, for scripts
    top = min(args.top, len(args.labels))
    for paths, image_emb in _image_embeddings(model, args.images):                   # (b, D)
        logits = _logits(model, image_emb, class_emb)                              # (b, labels)
        if model.config.family == "clip":   # a softmax over the labels: which one fits best
            scores = numpy.exp(logits - logits.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        else:                                # SigLIP: each label's own probability of matching
            scores = 1 / (1 + numpy.exp(-logits))
        for path, row in zip(paths, scores):
            if args.json:
                every_score[path] = dict(zip(args.labels, map(float, row)))
                continue
            ranked = numpy.argsort(-row)[:top]
            print(f"{path}: " + ", ".join(f"{args.labels[i]} {row[i]:.3f}" for i in ranked), flush=True)
    if args.json:
        print(json.dumps({"scores": method.split()[0], "labels": list(args.labels), "images": every_score},
                         indent=2))
    return 0


def run_embed(args):
    """Write normalised embeddings of the images and/or texts to an .npz file, encoding a batch at a time."""
    from . import evaluate
    from .files import staged_file
    if not args.images and not args.texts:
        raise CommandError("give --images and/or --texts to embed")
    tokenizer = _load_tokenizer(args.model, args.bpe) if args.texts else None
    model = _load_model(args.model, args.image_size)
    arrays = {}
    if args.images:
        image_emb, done = None, 0
        for paths, batch_emb in _image_embeddings(model, args.images):
            if image_emb is None:
                image_emb = numpy.empty((len(args.images), batch_emb.shape[1]), batch_emb.dtype)   # (images, D)
            image_emb[done:done + len(paths)] = batch_emb
            done += len(paths)
        arrays["image_emb"] = image_emb
    if args.texts:
        arrays["text_emb"] = backend.to_numpy(evaluate.encode_texts(model, tokenizer, args.texts))   # (texts, D)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"     # the name numpy.savez would give
    with staged_file(out) as staging:    # renamed over the target when complete: never a half-written file
        numpy.savez(staging, **arrays)
    if args.json:
        print(json.dumps({"out": os.path.abspath(out),
                          "arrays": {name: list(array.shape) for name, array in arrays.items()}}))
    else:
        print(f"wrote {', '.join(f'{name} {array.shape}' for name, array in arrays.items())} to {out}")
    return 0


def run_export(args):
    """Write a model and its tokenizer in another library's layout (``--format hf``: transformers)."""
    from . import hub
    _require_model_folder(args.model)
    model = hub.load_model(args.model)
    tokenizer = _load_tokenizer(args.model, args.bpe)
    for note in hub.export_hf(model, tokenizer, args.out):
        print(note)
    print(f"wrote {args.out}: config.json, model.safetensors, preprocessor_config.json and the tokenizer's files")
    return 0


def _train_config_values(args):
    """The TrainConfig fields the user gave as flags (argparse leaves out the ones not given)."""
    from .train import TrainConfig
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in vars(args).items() if name in fields}


def run_train(args):
    """Train a model (train.TrainConfig from the flags), or continue one with --resume; see the exit codes above."""
    from . import distributed, train
    values = _train_config_values(args)
    image_size = getattr(args, "image_size", None)
    comm = distributed.world()

    def configuration():
        if args.resume is None:
            if image_size is not None:
                values["model_overrides"] = {"image_size": image_size}
            config = train.TrainConfig(**values)        # first: a missing --init folder is named as such
            if "preset" in values and config.init:
                raise ValueError(f"--preset {values['preset']} with --init: the --init model brings its own "
                                 f"architecture, so the preset would be ignored; leave --preset out")
            return config
        if not values and image_size is None:
            return None                                      # the run's own configuration
        if image_size is not None:
            values["model_overrides"] = {**train.resume_config(args.resume).model_overrides, "image_size": image_size}
        return train.resume_config(args.resume, **values)

    try:
        config = train.agreed(comm, configuration)          # a bad flag is said once, not once per rank
        result = train.train(config, resume=args.resume, comm=comm)
    except train.FailedElsewhere:
        return EXIT_BAD_INPUT                                # the rank that failed has said why
    except train.NonFiniteLoss as error:                    # every rank meets it at the same step
        if comm.rank == 0:
            print(f"tinyclip train: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:                               # a second Ctrl-C
        _say(comm, "stopped at once by a second signal; the last checkpoint is kept (--resume continues from it)")
        return _end_job(comm, EXIT_STOPPED_AT_ONCE)
    except (CommandError, ValueError, OSError) as error:
        if comm.size == 1:
            raise                                            # main prints it
        _say(comm, str(error))
        return _end_job(comm, EXIT_BAD_INPUT)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_FINISHED


def _say(comm, message):
    where = f"rank {comm.rank} of {comm.size}: " if comm.size > 1 else ""
    print(f"tinyclip train: {where}{message}", file=sys.stderr, flush=True)


def _end_job(comm, status):
    """Under MPI, end every rank now: the others may be waiting for this one in a collective, and would wait
    for ever (MPI_Abort; the last complete checkpoint stays, as every write is staged). Alone, return ``status``."""
    if comm.size > 1:
        sys.stdout.flush()
        comm.abort(status)
    return status


def run_eval(args):
    """Evaluate a saved model: on your captions (--data), your classes (--classes), or the held-out shapes sets."""
    import json
    from . import evaluate
    from .hub import load_model
    _require_model_folder(args.model)
    model = load_model(args.model)
    tokenizer = _load_tokenizer(args.model, args.bpe)
    if args.data is None and args.classes is None:
        if args.linear_probe:
            raise CommandError("--linear-probe needs --classes DIR (a folder of one sub-folder per class)")
        metrics = evaluate.evaluate(model, tokenizer, **evaluate.shapes_sets(args.eval_per_class, args.eval_pairs,
                                                                             model.config.image_size))
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
    from .data.shards import read_pairs
    pairs = read_pairs(args.data, image_column=args.image_column, caption_column=args.caption_column, strict=True)
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


def field_comments(cls):
    """{field name: the comment on its line} of a dataclass, read from its source.

    The comment beside each field is the one place its meaning is written, so
    the command line's help is taken from it (and a field added later gets its
    flag and help with no other edit). {} when the source is not available.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    return {node.target.id: comments[node.end_lineno] for node in ast.parse(source).body[0].body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments}


def _flag_type(annotation):
    """int for ``int`` and ``int | None``, and so on; None for types a flag cannot give (dict)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(member for member in annotation.__args__ if member is not type(None))
    return annotation if annotation in (bool, int, float, str) else None


def _dtype_choice(value):
    """An argparse type: a dtype training can use, or the reason it cannot and what to use instead."""
    from .train import CHOICES, REFUSED_DTYPES
    if value in REFUSED_DTYPES:
        raise argparse.ArgumentTypeError(f"{value}: {REFUSED_DTYPES[value]}")
    if value not in CHOICES["dtype"]:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(CHOICES['dtype'])}")
    return value


def _add_train_arguments(parser):
    """A flag for each TrainConfig field, with the field's comment as help, its default and its choices."""
    from .train import CHANGEABLE_ON_RESUME, CHOICES, REFUSED_DTYPES, TrainConfig
    comments = field_comments(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        kind = _flag_type(field.type)
        if kind is None:              # model_overrides: --image-size below sets the one override a user needs
            continue
        help_text = comments.get(field.name, "")
        options = {"dest": field.name, "default": argparse.SUPPRESS}   # left out when not given (see --resume)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
            help_text += f" (default: {'on' if field.default else 'off'})"
        else:
            options.update(type=kind, metavar=field.name.upper().replace("_", "-"))
            if field.default is not None:
                help_text += f" (default: {field.default})"
            else:                                           # the comment says what None (not given) means
                help_text = help_text.replace("(None: ", "(default: ")
        if field.name == "dtype":             # not argparse choices: a refused dtype gets its reason
            options.update(type=_dtype_choice, metavar="{" + ",".join(CHOICES["dtype"]) + "}")
            help_text += f"; {' and '.join(REFUSED_DTYPES)} training is refused, with the reason"
        elif field.name in CHOICES:
            options.pop("metavar")
            options["choices"] = CHOICES[field.name]
        parser.add_argument("--" + field.name.replace("_", "-"), help=help_text.replace("%", "%%"), **options)
    parser.add_argument("--image-size", type=int, default=argparse.SUPPRESS, metavar="PIXELS",
                        help="image side in pixels (default: the preset's; the built-in shapes need at least 32)")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue the run in the folder RUN (or from a checkpoint in it) with its own settings "
                             "from its checkpoint; flags given with it may change only "
                             + ", ".join("--" + name.replace("_", "-") for name in CHANGEABLE_ON_RESUME)
                             + ". A finished run is left as it is")


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
    zeroshot.add_argument("--top", type=_positive_int, default=5, help="labels to show per image")
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
                                            "pictures into the run folder. SIGINT or SIGTERM: finish the step, "
                                            "save, exit 75; resume with --resume RUN. Exit codes: 0 finished, "
                                            "1 diverged (or an unexpected error, with its traceback), 2 bad input "
                                            "or a file that could not be read or written, on any rank under "
                                            "mpiexec, 75 interrupted and saved, 130 stopped at once "
                                            "by a second signal (docs/faults.md).")
    _add_train_arguments(train)
    train.set_defaults(run=run_train)

    evaluation = commands.add_parser(
        "eval", help="evaluate a model on your captions or classes (default: the held-out shapes sets)",
        description="Retrieval recall@1/5/10 both ways on image-caption pairs (--data), zero-shot top-1/top-5 "
                    "with per-class accuracy and a confusion matrix on a folder of class folders (--classes), "
                    "a linear probe (--linear-probe); without --data or --classes, the shapes sets as JSON.")
    evaluation.add_argument("--model", required=True, help="a tinyclip model folder (e.g. RUN/model)")
    evaluation.add_argument("--bpe", help="tokenizer file (default: looked up in the model folder)")
    evaluation.add_argument("--eval-per-class", type=_positive_int, default=10, help="shapes: zero-shot images per class")
    evaluation.add_argument("--eval-pairs", type=_positive_int, default=500, help="shapes: retrieval pairs and probe images")
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
    evaluation.add_argument("--probe-test-fraction", type=_open_fraction, default=0.5,
                            help="the share of each class held out to test the linear probe")
    evaluation.add_argument("--probe-c", type=_positive_number, default=1.0, help="the linear probe's inverse L2 strength C")
    evaluation.add_argument("--batch-size", type=_positive_int, default=64,
                            help="images and texts encoded at a time")
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
    if argv is None and args.command == "train" and _started_as_the_tinyclip_command():
        _restart_with_blas_thread_timeout()
    backend.tune_malloc()   # process-wide, so the command asks for it (importing tinyclip never does)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, args.command)
            return args.run(args)
    except (CommandError, ValueError, OSError) as error:   # bad files or inputs: their messages name them
        print(f"tinyclip {args.command}: {error}", file=sys.stderr)
        return 2


# OpenBLAS's idle threads spin for 2^28 cycles (about 0.1 s) after each matrix product before they sleep, on the
# very cores that tinyclip.parallel's threads need for the element-wise work between products. 2^4 cycles lets
# them sleep at once: the default run went from 0.57 to 0.49 s/step on 2 cores (median of 3; docs/vit.md,
# section 2). OpenBLAS reads the variable only as it loads, before any command runs, so ``tinyclip train``
# started without it runs itself again with it. The results do not change: only when the threads sleep.
BLAS_THREAD_TIMEOUT = ("OPENBLAS_THREAD_TIMEOUT", "4")


def _started_as_the_tinyclip_command():
    """Whether this process is the ``tinyclip`` console script or ``python -m tinyclip``: the only command lines that
    the restart may run again. A script of the user's that calls ``main()`` would run again from its first line (and
    one read from stdin, ``python - train``, would find stdin spent and do nothing), so it is never restarted."""
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    if spec is not None and spec.name == "tinyclip.__main__":
        return True
    # the wrapper pip writes for the console script has no spec; its file is the command itself
    return spec is None and os.path.basename(getattr(main_module, "__file__", None) or "") == "tinyclip"


def _restart_with_blas_thread_timeout():
    """Run this same command line again in this process with OPENBLAS_THREAD_TIMEOUT set (os.execv), unless the
    user set it, an MPI launcher started us (each rank has one BLAS thread there, and a rank must not be replaced
    behind its launcher's back), or the platform has no exec that keeps the process."""
    from . import distributed
    name, value = BLAS_THREAD_TIMEOUT
    if name in os.environ or distributed.under_launcher() or os.name != "posix" or not sys.executable:
        return
    os.environ[name] = value
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:     # the interpreter gone or not runnable (replaced since we started): train as we are
        del os.environ[name]


def _show_warning(command, message, category, filename, lineno, file=None, line=None):
    """A warning (a skipped image, say) as one line naming the command, without Python's source line."""
    print(f"tinyclip {command}: warning: {message}", file=sys.stderr if file is None else file)
