"""Supervised shape probe of a small ViT on the built-in shapes (docs/vit.md): does the image tower learn shape?

PyTorch on the CPU (not a tinyclip dependency: `pip install torch`), because
these probes ask how fast an architecture learns, not how tinyclip computes it.
Train: the single-object images of `shapes.zeroshot_set(200, seed=1)` (12,000
images, all colours and both sizes); test: `zeroshot_set(10, seed=0)` (600);
the label is the shape alone (6 classes, chance 0.167), so colour cannot help.
AdamW (β₂ 0.98, weight decay 0.1 on matrices), warm-up + cosine, batch 64,
one thread. Prints the test accuracy every 50 steps. Run from the checkout:

    PYTHONPATH=. python docs/vit/probe.py --width 64 --depth 3 --steps 600 [--mimetic] [--patch 4] [--bn] ...
"""
import os
import numpy as np
from tinyclip.data import shapes

CACHE = os.environ.get("TMPDIR", "/tmp")
def get(per_class, seed):
    f = os.path.join(CACHE, f"zs_{per_class}_{seed}.npz")
    if os.path.exists(f):
        d = np.load(f); return d["x"], d["y"]
    imgs, labels, names = shapes.zeroshot_set(per_class, seed=seed)
    x = np.stack([np.asarray(i) for i in imgs]).astype(np.uint8)
    y = np.asarray(labels) % 6   # class = colour*6+shape
    np.savez(f, x=x, y=y); return x, y


import argparse, time, math
import torch, torch.nn as nn, torch.nn.functional as F
p = argparse.ArgumentParser()
p.add_argument("--patch", type=int, default=8); p.add_argument("--width", type=int, default=128)
p.add_argument("--depth", type=int, default=4); p.add_argument("--heads", type=int, default=4)
p.add_argument("--steps", type=int, default=400); p.add_argument("--batch", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--smooth", type=float, default=0)
p.add_argument("--mimetic", action="store_true"); p.add_argument("--pool", default="gap")
p.add_argument("--pixln", action="store_true"); p.add_argument("--seed", type=int, default=0)
p.add_argument("--spt", action="store_true"); p.add_argument("--bn", action="store_true"); p.add_argument("--stride", type=int, default=0); p.add_argument("--shift", type=int, default=0)
a = p.parse_args()
torch.manual_seed(a.seed); torch.set_num_threads(1)
xtr, ytr = get(200, 1); xte, yte = get(10, 0)
mean = torch.tensor([0.481, 0.458, 0.408]).view(1,3,1,1); std = torch.tensor([0.269, 0.261, 0.276]).view(1,3,1,1)
def prep(x): return (torch.from_numpy(x).permute(0,3,1,2).float()/255 - mean)/std
Xtr, Xte = prep(xtr), prep(xte); Ytr, Yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
P, W = a.patch, a.width
stride = a.stride or P
class Block(nn.Module):
    def __init__(s):
        super().__init__(); s.ln1 = nn.LayerNorm(W); s.attn = nn.MultiheadAttention(W, a.heads, batch_first=True)
        s.ln2 = nn.LayerNorm(W); s.mlp = nn.Sequential(nn.Linear(W, 4*W), nn.GELU(approximate="tanh"), nn.Linear(4*W, W))
    def forward(s, x):
        h = s.ln1(x); x = x + s.attn(h, h, h, need_weights=False)[0]; return x + s.mlp(s.ln2(x))
class ViT(nn.Module):
    def __init__(s):
        super().__init__()
        s.embed = nn.Conv2d(15 if a.spt else 3, W, P, stride)
        g = (64 - P)//stride + 1; s.T = g*g
        s.pos = nn.Parameter(torch.randn(1, s.T, W) * 0.02)
        s.ln_pre = nn.LayerNorm(W); s.blocks = nn.ModuleList([Block() for _ in range(a.depth)])
        s.ln_post = nn.LayerNorm(W); s.head = nn.Linear(W, 6)
        if a.bn: s.bn = nn.BatchNorm1d(W)
    def forward(s, x):
        if a.spt:   # shifted patch tokenization (Lee et al. 2021): the image and its 4 diagonal half-patch shifts
            h = P // 2
            x = torch.cat([x] + [torch.roll(x, (dy, dx), (2, 3)) for dy in (-h, h) for dx in (-h, h)], 1)
        if a.pixln:
            u = F.unfold(x, P, stride=stride)  # B, 3PP, T
            u = (u - u.mean(1, keepdim=True)) / (u.std(1, keepdim=True) + 1e-3)
            t = (s.embed.weight.view(W, -1) @ u).transpose(1, 2) + s.embed.bias
        else:
            t = s.embed(x).flatten(2).transpose(1, 2)
        if a.bn: t = s.bn(t.reshape(-1, W)).reshape(t.shape)
        t = s.ln_pre(t + s.pos)
        for b in s.blocks: t = b(t)
        return s.head(s.ln_post(t.mean(1)))
m = ViT()
if a.smooth:
    with torch.no_grad():
        w = m.embed.weight; r = torch.arange(-3, 4).float(); k = torch.exp(-r**2/(2*a.smooth**2)); k = k/k.sum()
        k2 = (k[:,None]*k[None,:]).view(1,1,7,7).repeat(3,1,1,1)
        ws = F.conv2d(w, k2, padding=3, groups=3)
        w.copy_(ws * (w.norm() / ws.norm()))
if a.mimetic:
    with torch.no_grad():
        for b in m.blocks:
            Wq, Wk, Wv = b.attn.in_proj_weight.chunk(3)
            # mimetic (Trockman & Kolter 2023): W_q W_k^T ~ a I, W_v W_o ~ -b I
            Z = torch.randn(W, W) / math.sqrt(W)
            U, S, V = torch.linalg.svd(0.7 * Z + 0.7 * torch.eye(W)); 
            Wq.copy_((U @ torch.diag(S.sqrt())).T); Wk.copy_((V.T @ torch.diag(S.sqrt())).T)
            Z = torch.randn(W, W) / math.sqrt(W)
            U, S, V = torch.linalg.svd(0.4 * Z - 0.4 * torch.eye(W))
            Wv.copy_((U @ torch.diag(S.sqrt())).T); b.attn.out_proj.weight.copy_(V.T @ torch.diag(S.sqrt()))
decay = [p_ for n, p_ in m.named_parameters() if p_.ndim >= 2 and "pos" not in n]
other = [p_ for n, p_ in m.named_parameters() if not (p_.ndim >= 2 and "pos" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0}], lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
warm = min(50, a.steps // 8)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s+1)/warm if s < warm else 0.5*(1+math.cos(math.pi*(s-warm)/(a.steps-warm))))
g = torch.Generator().manual_seed(a.seed); t0 = time.time(); out = []
for step in range(1, a.steps + 1):
    idx = torch.randint(0, len(Xtr), (a.batch,), generator=g)
    x = Xtr[idx]
    if a.shift:
        dx, dy = torch.randint(-a.shift, a.shift+1, (2,), generator=g).tolist()
        x = torch.roll(x, (dy, dx), (2, 3))
    loss = F.cross_entropy(m(x), Ytr[idx]); opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step()
    if step % 50 == 0:
        m.eval()
        with torch.no_grad(): acc = (m(Xte).argmax(1) == Yte).float().mean().item()
        out.append(f"{step}:{acc:.2f}"); m.train(); print(step, f"{acc:.2f}", f"{time.time()-t0:.0f}s", flush=True)
print(vars(a), " ".join(out), f"{time.time()-t0:.0f}s", flush=True)
