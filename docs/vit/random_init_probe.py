"""Linear probe of the image embeddings of freshly initialised towers (docs/vit.md, section 1c): how much shape does
the initialisation alone make linearly readable?  `OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python docs/vit/random_init_probe.py`
(needs scikit-learn). Chance is 1/6 for shape and 1/10 for colour."""
import numpy as np
import tinyclip as tc
from tinyclip.data import shapes, transforms
from sklearn.linear_model import LogisticRegression
def data(per_class, seed):
    imgs, labels, _ = shapes.zeroshot_set(per_class, seed=seed)
    return transforms.normalize(np.stack([np.asarray(i) for i in imgs]), "clip"), np.asarray(labels)
xtr, ytr = data(20, 1); xte, yte = data(10, 0)
vit = dict(vision_width=64, vision_layers=3, vision_heads=4, vision_pooling="gap", class_token=False, position_embedding="sincos")
for name, cfg in [("cnn (shapes)", tc.models.preset("shapes")), ("vit (shapes-vit)", tc.models.preset("shapes-vit")),
                  ("vit w64 d3 sincos gap", tc.models.preset("shapes-vit", **vit))]:
    for seed in (0, 1):
        m = tc.models.CLIP(cfg, seed=seed)
        with tc.no_grad():      # training mode: the CNN's batch norm uses each 200-image chunk's statistics
            ftr, fte = (np.concatenate([m.encode_image(x[i:i + 200]).data for i in range(0, len(x), 200)])
                        for x in (xtr, xte))
        mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
        acc = {}
        for what, f in (("shape", lambda y: y % 6), ("colour", lambda y: y // 6)):
            clf = LogisticRegression(max_iter=3000, C=1.0).fit((ftr - mu) / sd, f(ytr))
            acc[what] = (clf.predict((fte - mu) / sd) == f(yte)).mean()
        print(f"{name:24s} seed {seed}: shape {acc['shape']:.3f} colour {acc['colour']:.3f}", flush=True)
