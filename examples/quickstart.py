"""Quick start: two towers learn a shared embedding with a contrastive loss, on a CPU in seconds.

The data are paired "views" of a hidden 16-d latent z: view A = tanh(z Wa)
plus noise (the "image", 48-d), view B = z Wb plus noise (the "caption",
32-d). Neither tower sees z; each is a small MLP followed by a projection
into a 32-d embedding space, L2-normalised. Training uses CLIP's symmetric
cross-entropy over the batch's similarity matrix (Radford et al. 2021),
``tinyclip.losses.clip_loss``, with its learnable temperature. Held-out
retrieval accuracy (pick the right B for each A among 512) climbs from
chance (0.2%) towards 100%.

    python examples/quickstart.py [--steps 300] [--batch 128] [--backend numpy|cupy]
"""

import argparse
import math
import time

import tinyclip as tc
import tinyclip.functional as F
from tinyclip import backend, nn, optim

LATENT, IMAGE_DIM, TEXT_DIM, EMBED = 16, 48, 32, 32


class Tower(nn.Module):
    """x -> LayerNorm -> residual MLP -> linear projection -> unit vector."""

    def __init__(self, in_dim, rng):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, rng=rng)
        self.mlp = nn.MLP(in_dim, 4 * in_dim, activation="gelu_tanh", rng=rng)
        self.proj = nn.Linear(in_dim, EMBED, bias=False, std=in_dim ** -0.5, rng=rng)

    def forward(self, x):
        h = self.norm(x)
        h = h + self.mlp(h)
        return F.l2_normalize(self.proj(h))                     # (B, EMBED)


class TwoTowers(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.image_tower = Tower(IMAGE_DIM, rng)
        self.text_tower = Tower(TEXT_DIM, rng)
        # the learnable temperature, stored as log of the logit scale (CLIP starts at 1/0.07)
        self.log_scale = nn.Parameter(rng.xp.full((), math.log(1 / 0.07), dtype=backend.default_dtype()))

    def forward(self, image, text):
        return self.image_tower(image), self.text_tower(text), self.log_scale


class PairedViews:
    """An endless source of (view A, view B) pairs from fixed random mixing matrices."""

    def __init__(self, seed, noise=0.5):
        self.rng = backend.RNG(seed)
        self.to_image = self.rng.normal((LATENT, IMAGE_DIM), std=LATENT ** -0.5)
        self.to_text = self.rng.normal((LATENT, TEXT_DIM), std=LATENT ** -0.5)
        self.noise = noise

    def sample(self, batch):
        z = self.rng.normal((batch, LATENT))                     # (B, LATENT)
        image = self.rng.xp.tanh(z @ self.to_image) + self.noise * self.rng.normal((batch, IMAGE_DIM))
        text = z @ self.to_text + self.noise * self.rng.normal((batch, TEXT_DIM))
        return image, text


def retrieval_top1(model, image, text):
    """Fraction of images whose most similar caption is their own."""
    with tc.no_grad():
        image_emb, text_emb, _ = model(image, text)
        best = (image_emb @ text_emb.T).data.argmax(axis=1)
    return float((best == image_emb.xp.arange(len(best))).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=backend.BACKENDS, default=None)
    args = parser.parse_args(argv)
    if args.backend:
        backend.set_backend(args.backend)

    data = PairedViews(args.seed)
    held_out_image, held_out_text = data.sample(512)
    model = TwoTowers(backend.RNG(args.seed + 1))
    groups = optim.param_groups_for_decay(model.named_parameters(), weight_decay=0.05)
    optimizer = optim.AdamW(groups, lr=args.lr)
    schedule = optim.WarmupCosine(optimizer, warmup_steps=args.steps // 10, total_steps=args.steps)

    print(f"tinyclip {tc.__version__} quick start on {backend.default_backend()}: "
          f"{sum(p.size for p in model.parameters())} parameters, batch {args.batch}, {args.steps} steps")
    print(f"step     0  held-out top-1 {retrieval_top1(model, held_out_image, held_out_text):6.1%}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        image, text = data.sample(args.batch)
        loss = tc.losses.clip_loss(*model(image, text))
        optimizer.zero_grad()
        loss.backward()
        optim.clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with tc.no_grad():   # CLIP caps the logit scale at 100
            model.log_scale.data[...] = model.log_scale.xp.minimum(model.log_scale.data, math.log(100))
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {math.exp(model.log_scale.item()):6.2f}  "
                  f"held-out top-1 {retrieval_top1(model, held_out_image, held_out_text):6.1%}")
    accuracy = retrieval_top1(model, held_out_image, held_out_text)
    print(f"done in {time.perf_counter() - start:.1f} s: held-out image->text top-1 {accuracy:.1%} "
          f"among 512 (chance {1 / 512:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
