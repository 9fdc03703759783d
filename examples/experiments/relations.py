"""Spatial relations: can contrastive training tell "A to the left of B" from "B to the left of A"?

The probe (``tinyclip.data.shapes.relation_probe``, after ReCLIP, Subramanian
et al. 2022): held-out images of two objects side by side; a model passes an
image when it scores the true caption above the same words with the objects
swapped (chance 0.5). The control asks the same model to prefer "A and B"
over a caption naming an absent object — no spatial reasoning needed.

Standard training gives little reason to learn the relation: in a batch of
random captions the swapped caption almost never appears, so word order is
never needed to find the right one (NegCLIP, Yuksekgonul et al. 2023, "When
and why vision-language models behave like bags-of-words"). NegCLIP's fix is
to add, for each image, hard negative captions to the batch. Here, for every
training caption with a relation ("A to the left of B", and above/below),
two extra texts are added that are false of its image: the objects swapped
("B to the left of A") and the relation swapped ("A to the right of B"). The
image -> text side of the loss then has B + E candidates per image; the
text -> image side (CLIP) and the positives are unchanged. Both models are
trained for the same steps on the same pairs.

    python examples/experiments/relations.py            # ~6 min on a loaded 2-core CPU
    python examples/experiments/relations.py --loss clip --steps 1500    # -> relations_clip_1500.json
    python examples/experiments/relations.py --tower vit --steps 800     # -> relations_siglip_800_vit.json
    python examples/experiments/relations.py --quick    # seconds: checks that it runs
"""

import sys
import time

import common                  # first: it sets the BLAS threads before NumPy loads
import numpy
from tinyclip import evaluate
from tinyclip import functional as F
from tinyclip.data import shapes

BATCH = 64
STEPS = 500
LOSS = "siglip"
# image towers: the shapes CNN ends in a global mean over positions; the ViT keeps a position embedding per patch
TOWERS = {"cnn": {}, "vit": {"preset": "shapes-vit", "model_overrides": {"vision_layers": 2, "patch_size": 8}}}
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


def hard_negatives(scene, caption):
    """Captions false of ``scene``'s image: objects swapped and relation swapped ([] without a relation)."""
    if scene.relation not in OPPOSITE:                # one object, or "A and B" (true in either order)
        return []
    first, second = caption.split(f" {scene.relation} ")
    return [f"{second} {scene.relation} {first}", f"{first} {OPPOSITE[scene.relation]} {second}"]


def loss_with_hard_negatives(toy, indices, images, captions):
    """The batch's loss with every relation caption's hard negatives as extra texts (negatives of their image).

    logits (B, B + E): row i scores image i against the B captions and the E
    hard negatives; positives are the diagonal of the first B columns.
    """
    owners, extra = [], []                        # the image each hard negative belongs to, and its text
    for row, (index, caption) in enumerate(zip(indices, captions)):
        for text in hard_negatives(toy.data.scene(index), caption):
            owners.append(row)
            extra.append(text)
    model, batch = toy.model, len(captions)
    image_emb = model.encode_image(toy.pixels(images))                              # (B, D)
    text_emb = model.encode_text(toy.tokens(captions + extra))                      # (B + E, D)
    logits = F.exp(model.log_scale) * (image_emb @ text_emb.T)                      # (B, B + E)
    note_training_accuracy(toy, logits.data, owners)
    positive = numpy.zeros(logits.shape, dtype=image_emb.data.dtype)
    positive[numpy.arange(batch), numpy.arange(batch)] = 1.0
    if toy.cfg.loss == "siglip":             # every pair a binary question: z = +1 on positives, -1 elsewhere
        z = 2.0 * positive - 1.0
        return -F.sum(F.log_sigmoid((logits + model.bias) * z)) * (1.0 / batch)
    # CLIP / NegCLIP: image -> text over all B + E texts; text -> image over the B images of the true captions
    image_to_text = F.sum(F.log_softmax(logits, axis=1) * positive)
    text_to_image = F.sum(F.log_softmax(logits[:, :batch], axis=0) * positive[:, :batch])
    return -(image_to_text + text_to_image) * (1.0 / (2 * batch))


def note_training_accuracy(toy, logits, owners):
    """Count, on this training batch, the hard negatives scored below their image's true caption."""
    batch = logits.shape[0]
    owners = numpy.asarray(owners, dtype=int)
    beaten = logits[owners, batch + numpy.arange(len(owners))] < logits[owners, owners]
    toy.hard_seen = getattr(toy, "hard_seen", 0) + len(owners)
    toy.hard_beaten = getattr(toy, "hard_beaten", 0) + int(beaten.sum())


def caption_similarity(toy, quick):
    """Mean cosine between the text embeddings of the probe's true and swapped captions (1: bag of words)."""
    probe = common.eval_sets(quick)["relation"]
    toy.model.eval()
    true = evaluate.encode_texts(toy.model, toy.tokenizer, probe.true_captions)
    swapped = evaluate.encode_texts(toy.model, toy.tokenizer, probe.swapped_captions)
    toy.model.train()
    return float((true * swapped).sum(axis=1).mean())


def left_right_from_image(toy, quick):
    """Can the image embeddings alone tell which object is on the left? Held-out accuracy of a linear classifier.

    Each probe image shows two different (colour, shape) classes side by side;
    the label is whether the one on the left comes first in a fixed order of
    the classes. Both arrangements of a pair are equally likely, so an
    embedding that only records which objects are present scores 0.5.
    """
    probe = shapes.relation_probe(120 if quick else 600, seed=1, image_size=toy.model.config.image_size)
    labels = []
    for scene in probe.scenes:
        first, second = scene.objects
        left, right = (first, second) if scene.relation == "to the left of" else (second, first)
        labels.append(int((left.colour, left.shape) < (right.colour, right.shape)))
    toy.model.eval()
    features = evaluate.encode_images(toy.model, probe.images)
    toy.model.train()
    half = len(labels) // 2
    accuracy, _ = evaluate.linear_probe(features[:half], labels[:half], features[half:], labels[half:], classes=2)
    return accuracy


def main(argv=None):
    parser = common.arguments(__doc__)
    parser.add_argument("--loss", choices=("siglip", "clip"), default=LOSS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--tower", choices=tuple(TOWERS), default="cnn",
                        help="image tower: the small CNN (global mean) or a small ViT (position embeddings)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    batch, steps = (16, 3) if args.quick else (BATCH, args.steps)
    runs = []
    for name, loss_fn in (("standard", None), ("hard negatives", loss_with_hard_negatives)):
        for seed in range(args.seeds):
            cfg = common.config(args.quick, loss=args.loss, batch_size=batch, steps=steps, seed=seed,
                                **TOWERS[args.tower])
            toy = common.Toy(cfg, loss_fn=loss_fn)
            curve = []

            def probe(toy):
                curve.append({"step": toy.steps_done, **toy.evaluate(args.quick),
                              "true_vs_swapped_caption_cosine": round(caption_similarity(toy, args.quick), 4),
                              "left_right_from_image": round(left_right_from_image(toy, args.quick), 4)})
                if loss_fn is not None and toy.steps_done:     # since the last point: hard negatives beaten
                    curve[-1]["training_hard_negatives_beaten"] = round(toy.hard_beaten / max(toy.hard_seen, 1), 4)
                    toy.hard_seen = toy.hard_beaten = 0
                print(name, curve[-1], flush=True)

            probe(toy)                           # step 0: what the untrained towers already tell apart
            losses = toy.run(every=max(1, steps // 5), callback=probe)
            runs.append({"training": name, "seed": seed, "final_loss": round(losses[-1], 4), "curve": curve,
                         **curve[-1]})

    plt = common.pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for run in runs:
        steps_axis = [point["step"] for point in run["curve"]]
        style = "-" if run["training"] == "hard negatives" else "--"
        axis.plot(steps_axis, [p["relation_acc"] for p in run["curve"]], "o" + style, color="C0",
                  label=f"relation, {run['training']}" if run["seed"] == 0 else None)
        axis.plot(steps_axis, [p["control_acc"] for p in run["curve"]], "s" + style, color="C1",
                  label=f"control, {run['training']}" if run["seed"] == 0 else None)
    axis.axhline(0.5, color="grey", linestyle=":")
    axis.axhline(0.85, color="green", linestyle=":", linewidth=0.8)
    axis.set_xlabel(f"step (batch {batch}, {args.loss} loss)")
    axis.set_ylabel("held-out probe accuracy")
    axis.legend(fontsize=7)
    # the default run is relations.json; another loss or length is written beside it, not over it
    name = ("relations" if (args.loss, args.steps, args.tower) == (LOSS, STEPS, "cnn")
            else f"relations_{args.loss}_{args.steps}" + ("_vit" if args.tower == "vit" else ""))
    settings = {"batch_size": batch, "steps": steps, "loss": args.loss, "tower": args.tower, "seeds": args.seeds,
                "preset": cfg.preset, "model": cfg.model_overrides}
    common.write(args.out, name, {"settings": settings, "runs": runs}, started, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
