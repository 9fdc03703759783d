"""Contrastive probe of a small ViT on the built-in shapes (docs/vit.md, section 1c): what does the loss teach it?

PyTorch on the CPU (not a tinyclip dependency: `pip install torch`), like
probe.py: it asks how fast a model learns, not how tinyclip computes it, and
lets one change a tower or the loss in a line. The data are tinyclip's own
training stream (`ShapesDataset(seed=0)`, fresh images every step, the real
captions), the text tower a 2-layer causal transformer pooled at its
end-of-text token over a word vocabulary (`--text bow`: the mean of the word
embeddings instead), the loss SigLIP (scale 10, bias -10, both learnt; pairs
with equal captions count as positives) or CLIP (`--loss clip`). Every
`--eval_every` steps it prints zero-shot top-1 on `zeroshot_set(10, seed=0)`
(600 images, 60 classes, the prompts "a small {}" / "a large {}"), the shape
and the colour of the predicted class separately, and the text side's
separation of the shapes: the mean cosine between the embeddings of
"a small C S" and "a small C S'" over colours C and shape pairs S != S'
(1.0: the text tower no longer tells the shapes apart).

Auxiliary image-side losses (docs/vit.md, section 1d), weighted by
``--aux_words`` and added to the contrastive loss (or alone, with the
diagnostic ``--no_contrastive``): ``--aux_loss bce``, a linear head on the
pooled image features with one logistic per caption word (multi-label, as
CatLIP, Mehta et al. 2024); ``softmax``, its cross-entropy to the
normalised multi-hot vector (SuperClass, Huang et al. 2024); ``caption``, a
2-layer causal decoder that predicts every caption token from the pooled
features, given as a prefix token, and the tokens before it (a small
CapPa / CoCa captioning loss, Tschannen et al. 2023, Yu et al. 2022).
``--aux_vocab shapes`` keeps only the shape words as the head's labels: a
supervised diagnostic, not a method. With an auxiliary loss the line also
prints ``head-shape``: the head's shape accuracy on the zero-shot images
(for ``caption``, the likeliest shape word after "a small <true colour>").
Run from the checkout:

    PYTHONPATH=. python docs/vit/contrastive_probe.py --steps 800 [--text bow] [--freeze_text 100000] \
        [--colours_per_batch 3] [--tower cnn] [--aux_words 1 --aux_loss caption [--no_contrastive]]
"""
import argparse, math, time
import numpy as np
from tinyclip.data import shapes
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--tower", default="vit"); p.add_argument("--patch", type=int, default=8)
p.add_argument("--width", type=int, default=64); p.add_argument("--depth", type=int, default=3)
p.add_argument("--heads", type=int, default=4); p.add_argument("--steps", type=int, default=1000)
p.add_argument("--batch", type=int, default=128); p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--text_lr", type=float, default=None); p.add_argument("--freeze_text", type=int, default=0)
p.add_argument("--loss", default="siglip"); p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_every", type=int, default=100); p.add_argument("--text", default="transformer")  # or bow
p.add_argument("--mimetic", action="store_true"); p.add_argument("--threads", type=int, default=1)
p.add_argument("--pos", default="sincos")
p.add_argument("--warm", type=int, default=100)
p.add_argument("--colours_per_batch", type=int, default=0)
p.add_argument("--aux_words", type=float, default=0.0)  # weight of a caption-word (multi-label) head on the image tower
p.add_argument("--aux_loss", default="bce")  # bce: one logistic per word; softmax: SuperClass's cross-entropy to the normalised multi-hot
p.add_argument("--aux_vocab", default="all")  # all: every caption word; shapes: the shape words only (diagnostic)
p.add_argument("--no_contrastive", action="store_true")  # diagnostic: the word head's loss alone
p.add_argument("--single", action="store_true")   # diagnostic only: train on the one-object images alone
a = p.parse_args()
torch.manual_seed(a.seed); torch.set_num_threads(a.threads)

MEAN = torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1); STD = torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1)
def prep(x): return (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD

words = set("a an and small large to the left of right above below on at top bottom in centre".split())
words |= set(shapes.SHAPES) | set(shapes.COLOURS)
vocab = {w: i + 1 for i, w in enumerate(sorted(words))}; EOT = len(vocab) + 1; CTX = 16
def tok(caps):
    out = np.zeros((len(caps), CTX), np.int64); last = np.zeros(len(caps), np.int64)
    for k, c in enumerate(caps):
        ids = [vocab[w] for w in c.split()][:CTX - 1] + [EOT]
        out[k, :len(ids)] = ids; last[k] = len(ids) - 1
    return torch.from_numpy(out), torch.from_numpy(last)

class Block(nn.Module):
    def __init__(s, W, H):
        super().__init__(); s.ln1 = nn.LayerNorm(W); s.attn = nn.MultiheadAttention(W, H, batch_first=True)
        s.ln2 = nn.LayerNorm(W); s.mlp = nn.Sequential(nn.Linear(W, 4 * W), nn.GELU(approximate="tanh"), nn.Linear(4 * W, W))
    def forward(s, x, mask=None):
        h = s.ln1(x); x = x + s.attn(h, h, h, need_weights=False, attn_mask=mask)[0]; return x + s.mlp(s.ln2(x))

def sincos(g, W):
    y, x = torch.meshgrid(torch.arange(g).float(), torch.arange(g).float(), indexing="ij")
    om = 1.0 / 10000 ** (torch.arange(W // 4).float() / (W // 4))
    o = [torch.sin(x.flatten()[:, None] * om), torch.cos(x.flatten()[:, None] * om),
         torch.sin(y.flatten()[:, None] * om), torch.cos(y.flatten()[:, None] * om)]
    return torch.cat(o, 1)[None]

class ViT(nn.Module):
    def __init__(s, W, D, H, P, E):
        super().__init__(); s.embed = nn.Conv2d(3, W, P, P); g = 64 // P
        if a.pos == "sincos": s.register_buffer("pos", sincos(g, W))
        else: s.pos = nn.Parameter(torch.randn(1, g * g, W) * 0.02)
        s.ln_pre = nn.LayerNorm(W); s.blocks = nn.ModuleList([Block(W, H) for _ in range(D)])
        s.ln_post = nn.LayerNorm(W); s.proj = nn.Linear(W, E, bias=False)
        if a.mimetic:
            with torch.no_grad():
                for b in s.blocks:
                    Wq, Wk, Wv = b.attn.in_proj_weight.chunk(3)
                    Z = torch.randn(W, W) / math.sqrt(W); U, S, V = torch.linalg.svd(0.7 * Z + 0.7 * torch.eye(W))
                    Wq.copy_((U @ torch.diag(S.sqrt())).T); Wk.copy_((V.T @ torch.diag(S.sqrt())).T)
    def pooled(s, x):
        t = s.embed(x).flatten(2).transpose(1, 2); t = s.ln_pre(t + s.pos)
        for b in s.blocks: t = b(t)
        return s.ln_post(t.mean(1))
    def forward(s, x): return s.proj(s.pooled(x))

class CNN(nn.Module):
    def __init__(s, E, ch=(32, 64, 128, 256)):
        super().__init__(); layers = []; c = 3
        for o in ch: layers += [nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o), nn.GELU(approximate="tanh"), nn.MaxPool2d(2)]; c = o
        s.f = nn.Sequential(*layers); s.proj = nn.Linear(c, E)
    def forward(s, x): return s.proj(s.f(x).mean((2, 3)))

class Text(nn.Module):
    def __init__(s, W=128, D=2, H=4, E=128):
        super().__init__(); s.emb = nn.Embedding(EOT + 1, W); s.pos = nn.Parameter(torch.randn(CTX, W) * 0.01)
        s.blocks = nn.ModuleList([Block(W, H) for _ in range(D)]); s.ln = nn.LayerNorm(W); s.proj = nn.Linear(W, E, bias=False)
        s.register_buffer("mask", torch.triu(torch.full((CTX, CTX), float("-inf")), 1))
    def forward(s, ids, last):
        x = s.emb(ids) + s.pos
        for b in s.blocks: x = b(x, s.mask)
        x = s.ln(x)[torch.arange(len(ids)), last]; return s.proj(x)

E = 128
vis = ViT(a.width, a.depth, a.heads, a.patch, E) if a.tower == "vit" else CNN(E)
class BOW(nn.Module):
    def __init__(s, W=128, E=128):
        super().__init__(); s.emb = nn.Embedding(EOT + 1, W); s.proj = nn.Linear(W, E, bias=False)
    def forward(s, ids, last):
        m = (ids > 0).float()[..., None]; return s.proj((s.emb(ids) * m).sum(1) / m.sum(1))
txt = Text(E=E) if a.text == "transformer" else BOW(E=E)
word_head = nn.Linear(a.width, len(vocab) + 1)
class Captioner(nn.Module):   # CapPa / CoCa-style captioning loss, small: the image's pooled features as a prefix token
    def __init__(s, W=128, D=2, H=4):
        super().__init__(); s.img = nn.Linear(a.width, W); s.emb = nn.Embedding(EOT + 1, W)
        s.pos = nn.Parameter(torch.randn(CTX + 1, W) * 0.01)
        s.blocks = nn.ModuleList([Block(W, H) for _ in range(D)]); s.ln = nn.LayerNorm(W); s.out = nn.Linear(W, EOT + 1)
        s.register_buffer("mask", torch.triu(torch.full((CTX + 1, CTX + 1), float("-inf")), 1))
    def forward(s, pooled, ids):   # logits (B, CTX, V) for tokens 0..CTX-1, position t seeing the image and tokens < t
        x = torch.cat([s.img(pooled)[:, None], s.emb(ids)], 1) + s.pos
        for b in s.blocks: x = b(x, s.mask)
        return s.out(s.ln(x))[:, :CTX]
captioner = Captioner()
def word_targets(caps):
    y = torch.zeros(len(caps), len(vocab) + 1)
    for k, c in enumerate(caps):
        for w in c.split():
            if a.aux_vocab == "all" or w in shapes.SHAPES: y[k, vocab[w]] = 1.0
    return y
log_scale = nn.Parameter(torch.tensor(math.log(10.0))); bias = nn.Parameter(torch.tensor(-10.0))

def groups(mod, lr):
    dec = [q for n, q in mod.named_parameters() if q.ndim >= 2 and "pos" not in n and "emb." not in n]
    oth = [q for n, q in mod.named_parameters() if not (q.ndim >= 2 and "pos" not in n and "emb." not in n)]
    return [{"params": dec, "weight_decay": 0.1, "lr": lr}, {"params": oth, "weight_decay": 0.0, "lr": lr}]
tlr = a.lr if a.text_lr is None else a.text_lr
pg = groups(vis, a.lr) + groups(txt, tlr) + [{"params": [log_scale, bias], "weight_decay": 0.0, "lr": a.lr}] + groups(word_head, a.lr) + groups(captioner, a.lr)
opt = torch.optim.AdamW(pg, lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
base = [g["lr"] for g in opt.param_groups]
def lr_at(s): return (s + 1) / a.warm if s < a.warm else 0.5 * (1 + math.cos(math.pi * (s - a.warm) / (a.steps - a.warm)))

ds = shapes.ShapesDataset(seed=0)
zs_imgs, zs_labels, names = shapes.zeroshot_set(10, seed=0)
ZX = prep(np.stack([np.asarray(i) for i in zs_imgs])); ZY = torch.as_tensor(np.asarray(zs_labels))
prompts = [t.format(n) for n in names for t in shapes.ZEROSHOT_TEMPLATES]

def evaluate():
    vis.eval(); txt.eval()
    with torch.no_grad():
        ie = F.normalize(vis(ZX), dim=-1); te = F.normalize(txt(*tok(prompts)), dim=-1)
        ce = F.normalize(te.view(len(names), len(shapes.ZEROSHOT_TEMPLATES), -1).mean(1), dim=-1)
        pred = (ie @ ce.T).argmax(1)
        acc = (pred == ZY).float().mean().item(); sacc = (pred % 6 == ZY % 6).float().mean().item()
        cacc = (pred // 6 == ZY // 6).float().mean().item()
        shape_ids = [vocab[w] for w in shapes.SHAPES]
        hacc = (word_head(vis.pooled(ZX))[:, shape_ids].argmax(1) == ZY % 6).float().mean().item()
        if a.aux_loss == "caption":
            cols = [names[int(y)].split()[0] for y in ZY]
            pid, _ = tok([f"a small {c}" for c in cols]); cl = captioner(vis.pooled(ZX), pid)[:, 3]
            hacc = (cl[:, shape_ids].argmax(1) == ZY % 6).float().mean().item()
        # text side: how far apart are shapes of one colour? mean cos between "a small red X" over X pairs
        te2 = te.view(len(names), 2, -1)[:, 0].view(10, 6, -1)
        c = te2 @ te2.transpose(1, 2); off = c[:, ~torch.eye(6, dtype=bool)].mean().item()
    vis.train(); txt.train(); return acc, sacc, cacc, off, hacc

t0 = time.time(); rng = np.random.default_rng(a.seed); cursor = 0
for step in range(a.steps):
    f = lr_at(step)
    for g, b0 in zip(opt.param_groups, base): g["lr"] = b0 * f
    if step < a.freeze_text:
        for g in opt.param_groups[2:4]: g["lr"] = 0.0
    n = a.batch
    if a.single:
        picked = []
        while len(picked) < n:
            if len(ds.scene(cursor).objects) == 1:
                picked.append(cursor)
            cursor += 1
        imgs, caps = ds.batch(picked)
    elif a.colours_per_batch:
        chosen = set(rng.choice(list(shapes.COLOURS), a.colours_per_batch, replace=False)); picked = []
        while len(picked) < n:
            sc = ds.scene(cursor); cursor += 1
            if all(o.colour in chosen for o in sc.objects): picked.append(cursor - 1)
        imgs, caps = ds.batch(picked)
    else:
        imgs, caps = ds.batch(range(step * n, step * n + n))
    x = prep(imgs); ids, last = tok(caps)
    pooled = vis.pooled(x); ie = F.normalize(vis.proj(pooled), dim=-1); te = F.normalize(txt(ids, last), dim=-1)
    logits = ie @ te.T * log_scale.exp() + bias
    if a.loss == "siglip":
        same = torch.tensor([[ci == cj for cj in caps] for ci in caps], dtype=torch.float32)
        lab = 2 * same - 1
        loss = -F.logsigmoid(lab * logits).sum() / len(caps)
    else:
        l2 = ie @ te.T * log_scale.exp(); tgt = torch.arange(len(caps))
        loss = (F.cross_entropy(l2, tgt) + F.cross_entropy(l2.T, tgt)) / 2
    if a.aux_words:
        wl, wt = word_head(pooled), word_targets(caps)
        if a.aux_loss == "caption":
            cl = captioner(pooled, ids)          # predict every token (and EOT), pads ignored
            aux = F.cross_entropy(cl.reshape(-1, EOT + 1), ids.reshape(-1), ignore_index=0, reduction="sum") / len(caps)
        elif a.aux_loss == "bce":
            aux = F.binary_cross_entropy_with_logits(wl, wt, reduction="sum") / len(caps)
        else:
            aux = -(wt / wt.sum(1, keepdim=True) * F.log_softmax(wl, 1)).sum() / len(caps)
        loss = a.aux_words * aux + (0.0 if a.no_contrastive else loss)
    opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): log_scale.clamp_(max=math.log(100))
    if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
        acc, sacc, cacc, off, hacc = evaluate()
        print(f"step {step+1} loss {loss.item():.3f} zs {acc:.3f} shape {sacc:.3f} colour {cacc:.3f} "
              f"text-cos-same-colour {off:.3f} head-shape {hacc:.3f} scale {log_scale.exp().item():.1f} bias {bias.item():.1f} {time.time()-t0:.0f}s", flush=True)
print("args", vars(a))
