"""The two-tower model: CLIP (Radford et al. 2021) or SigLIP (Zhai et al. 2023) by its config.

Both towers map into one embedding space where the outputs are
L2-normalised, so a logit is t·cos(image, text). The temperature is learned
as its logarithm t' (``log_scale``): CLIP starts at t = 1/0.07 and the trainer
caps t at 100; SigLIP starts at t = 10 with a learned ``bias`` b = −10, which
offsets the many easy negatives of the sigmoid loss at the start of training
(the SigLIP paper, section 3.2). The model's outputs are what
``tinyclip.losses`` takes: ``clip_loss(image_emb, text_emb, log_scale)`` or
``siglip_loss(image_emb, text_emb, log_scale, bias)``.

Initialisation follows OpenAI's CLIP code: token embeddings N(0, 0.02²),
text positions N(0, 0.01²), attention and MLP input maps N(0, width⁻¹) and
N(0, (2·width)⁻¹), the maps back into the residual stream scaled down by
(2·layers)^−½, projections N(0, width⁻¹).
"""

from .. import backend as _backend
from .. import functional as F
from .. import nn
from .config import CLIPConfig
from .text import TextTower
from .vision import ConvTower, VisionTower


class CLIP(nn.Module):
    """``model(images, tokens) -> (image_emb, text_emb, log_scale, bias)``; bias is None for CLIP."""

    def __init__(self, config, dtype=None, backend=None, seed=0, values=True):
        """The model of ``config``, its parameters in ``dtype`` on ``backend``, drawn from ``seed``.

        ``values=False`` builds it without values (``nn.NoValues``): every
        parameter has its shape and dtype, nothing is drawn or allocated, and
        the model cannot run until each parameter's ``data`` is replaced, as
        ``tinyclip.checkpoint.load`` does with the weights of a file.
        Raises TypeError when ``config`` is not a CLIPConfig.
        """
        super().__init__()
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"CLIP needs a CLIPConfig (see tinyclip.models.preset), got {type(config).__name__}")
        self.config = config
        rng = _backend.RNG(seed, backend) if values else nn.NoValues(backend)
        dtype = _backend.default_dtype() if dtype is None else dtype
        init = {"dtype": dtype, "backend": rng.backend, "rng": rng}
        self.visual = (ConvTower if config.vision_type == "cnn" else VisionTower)(config, **init)
        self.text = TextTower(config, **init)
        xp = rng.xp

        def scalar(value):
            return nn.Parameter(xp.full((), value, dtype=dtype) if values else rng.placeholder((), dtype))

        self.log_scale = scalar(config.init_log_scale)
        self.bias = None if config.init_bias is None else scalar(config.init_bias)
        if values:
            _init_like_clip(self, rng)

    def encode_image(self, images, normalize=True):
        """Images (B, H, W, 3) float → (B, embed_dim), unit length when ``normalize``."""
        features = self.visual(self._on_model_backend(images))
        return F.l2_normalize(features) if normalize else features

    def encode_text(self, tokens, normalize=True):
        """Token ids (B, T) → (B, embed_dim), unit length when ``normalize``."""
        features = self.text(self._on_model_backend(tokens))
        return F.l2_normalize(features) if normalize else features

    def _on_model_backend(self, value):
        """A plain array moved to the parameters' backend (NumPy images into a CuPy model); Tensors as they are."""
        if getattr(value, "is_tensor", False) or not hasattr(value, "shape"):
            return value
        return _backend.asarray(value, _backend.backend_of(self.log_scale.data))

    def forward(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens), self.log_scale, self.bias


def _init_like_clip(model, rng):
    """Redraw the weight matrices with the standard deviations of OpenAI's CLIP code."""
    config = model.config
    towers = ((("visual.", config.vision_width, config.vision_layers),) if config.vision_type == "vit" else ()) + (
        ("text.", config.text_width, config.text_layers),)         # a CNN tower keeps its own initialisation
    for prefix, width, layers in towers:
        attention_std = width ** -0.5
        residual_std = attention_std * (2 * layers) ** -0.5      # maps that write into the residual stream
        rules = ((".attn.out_proj.weight", residual_std), (".mlp.fc2.weight", residual_std),
                 (".attn.q_proj.weight", attention_std), (".attn.k_proj.weight", attention_std),
                 (".attn.v_proj.weight", attention_std), (".mlp.fc1.weight", (2 * width) ** -0.5),
                 ("proj.weight", width ** -0.5))
        for name, parameter in model.named_parameters():
            if not name.startswith(prefix) or parameter.ndim != 2 or "embedding" in name:
                continue
            std = next((std for suffix, std in rules if name.endswith(suffix)), None)
            if std is not None:
                draw = rng.normal(parameter.shape, std=std, dtype=parameter.dtype)
                parameter.data[...] = _backend.asarray(draw, _backend.backend_of(parameter.data), parameter.dtype)
    if config.vision_type == "vit" and config.vision_attention_init == "mimetic":
        for block in model.visual.transformer.blocks:
            nn.mimetic_init(block.attn, rng)
