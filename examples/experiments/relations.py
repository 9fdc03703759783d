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

    python examples/experiments/relations.py            # ~8 min on 2 cores
    python examples/experiments/relations.py --quick    # seconds: checks that it runs
"""

import sys
import time

import common                  # first: it sets the BLAS threads before NumPy loads
import numpy
from tinyclip import functional as F

BATCH = 64
STEPS = 500
LOSS = "siglip"
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
    extra = [text for index, caption in zip(indices, captions)
             for text in hard_negatives(toy.data.scene(index), caption)]
    model, batch = toy.model, len(captions)
    image_emb = model.encode_image(toy.pixels(images))                              # (B, D)
    text_emb = model.encode_text(toy.tokens(captions + extra))                      # (B + E, D)
    logits = F.exp(model.log_scale) * (image_emb @ text_emb.T)                      # (B, B + E)
    positive = numpy.zeros(logits.shape, dtype=image_emb.data.dtype)
    positive[numpy.arange(batch), numpy.arange(batch)] = 1.0
    if toy.cfg.loss == "siglip":             # every pair a binary question: z = +1 on positives, -1 elsewhere
        z = 2.0 * positive - 1.0
        return -F.sum(F.log_sigmoid((logits + model.bias) * z)) * (1.0 / batch)
    # CLIP / NegCLIP: image -> text over all B + E texts; text -> image over the B images of the true captions
    image_to_text = F.sum(F.log_softmax(logits, axis=1) * positive)
    text_to_image = F.sum(F.log_softmax(logits[:, :batch], axis=0) * positive[:, :batch])
    return -(image_to_text + text_to_image) * (1.0 / (2 * batch))


def main(argv=None):
    parser = common.arguments(__doc__)
    parser.add_argument("--loss", choices=("siglip", "clip"), default=LOSS)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    batch, steps = (16, 3) if args.quick else (BATCH, args.steps)
    runs = []
    for name, loss_fn in (("standard", None), ("hard negatives", loss_with_hard_negatives)):
        for seed in range(args.seeds):
            cfg = common.config(args.quick, loss=args.loss, batch_size=batch, steps=steps, seed=seed)
            toy = common.Toy(cfg, loss_fn=loss_fn)
            curve = []

            def probe(toy):
                curve.append({"step": toy.steps_done, **toy.evaluate(args.quick)})
                print(name, curve[-1], flush=True)

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
    common.write(args.out, "relations", {"settings": {"batch_size": batch, "steps": steps, "loss": args.loss,
                                                      "seeds": args.seeds, "model": common.SMALL},
                                         "runs": runs}, started, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
