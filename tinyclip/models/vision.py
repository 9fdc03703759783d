"""The vision towers: a Vision Transformer (Dosovitskiy et al. 2021) as CLIP and SigLIP use it, and a small CNN.

images (B, H, W, 3) → patches (B, N, P·P·3) → linear → [class token] + position
embedding → [ln_pre] → pre-LN blocks → ln_post → pooling → [projection].

Patchify is a reshape and a transpose followed by a linear map: the same as a
stride-P convolution with a P×P kernel, whose weight (width, 3, P, P) is this
linear weight with its input axis ordered (P, P, 3). Pooling is the class
token (CLIP), the average of all tokens ("gap"), or SigLIP's multihead
attention pooling ("map"): one learned probe attends over the tokens, then a
residual MLP on its layer-normed output.

The CNN tower (``vision_type="cnn"``) is the small convolutional network the
built-in ``shapes`` preset trains on a CPU: stages of a 3×3 stride-2
convolution, batch norm and the activation, then the average over positions
and the projection. CLIP's own paper trains ResNets beside ViTs; this is a
much smaller relative, chosen because from scratch, on a few minutes of a
CPU, it learns what shapes look like where a ViT of the same cost learns
only their colours (README, "Training", has the measurements).
"""

import numpy

from .. import backend
from .. import functional as F
from .. import nn


def sincos_position_embedding(grid, width, class_token=False):
    """The fixed 2-D sine-cosine position embedding, (grid², width) or (1 + grid², width) with a class token.

    Token (row y, column x) of a grid × grid patch grid gets
    [sin(x ω), cos(x ω), sin(y ω), cos(y ω)], ω_k = 10000^(−k / (width/4)),
    k = 0 .. width/4 − 1 (Chen et al. 2021, MoCo v3, §4; big_vision's
    ``posemb_sincos_2d``); a class token's row is zero. Returns float64 NumPy.
    Raises ValueError when width is not a multiple of 4.
    """
    if width % 4:
        raise ValueError(f"sincos_position_embedding: width must be a multiple of 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (numpy.arange(quarter) / quarter)                # (W/4,)
    y, x = numpy.meshgrid(numpy.arange(grid), numpy.arange(grid), indexing="ij")
    angles_x = x.reshape(-1, 1) * omega                                      # (N, W/4), row-major tokens
    angles_y = y.reshape(-1, 1) * omega
    table = numpy.concatenate([numpy.sin(angles_x), numpy.cos(angles_x),
                               numpy.sin(angles_y), numpy.cos(angles_y)], axis=1)   # (N, W)
    if class_token:
        table = numpy.concatenate([numpy.zeros((1, width)), table], axis=0)  # (1 + N, W)
    return table


def _checked_image_shape(images, config):
    """The shape of ``images`` when it is (batch, image_size, image_size, 3) for ``config``, else a ValueError."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != (config.image_size, config.image_size, 3):
        raise ValueError(f"images must have shape (batch, {config.image_size}, {config.image_size}, 3) "
                         f"for this model, got {shape}")
    return shape


class AttentionPoolingHead(nn.Module):
    """SigLIP's "map" head: y = a + mlp(ln(a)),  a = attention(probe, tokens)."""

    def __init__(self, config, **init):
        super().__init__()
        width = config.vision_width
        self.probe = nn.Parameter(init["rng"].normal((1, 1, width), std=width ** -0.5, dtype=init["dtype"]))
        self.attn = nn.MultiHeadAttention(width, config.vision_heads, **init)
        self.ln = nn.LayerNorm(width, config.ln_eps, **init)
        self.mlp = nn.MLP(width, int(width * config.vision_mlp_ratio), config.activation, **init)

    def forward(self, tokens):                                              # (B, T, W)
        probe = F.broadcast_to(self.probe, (tokens.shape[0], 1, tokens.shape[2]))   # (B, 1, W)
        pooled = self.attn(probe, context=tokens)                           # (B, 1, W)
        pooled = pooled + self.mlp(self.ln(pooled))
        return F.reshape(pooled, (tokens.shape[0], tokens.shape[2]))        # (B, W)


class VisionTower(nn.Module):
    """Images (B, H, W, 3) float → image features (B, embed_dim), not yet normalised."""

    def __init__(self, config, **init):
        super().__init__()
        self.config = config
        width, patch = config.vision_width, config.patch_size
        rng, dtype = init["rng"], init["dtype"]
        self.patch_embed = nn.Linear(patch * patch * 3, width, bias=config.patch_bias, **init)
        tokens = config.num_patches + (1 if config.class_token else 0)
        if config.class_token:
            self.class_embedding = nn.Parameter(rng.normal((width,), std=width ** -0.5, dtype=dtype))
        if config.position_embedding == "learned":
            self.position_embedding = nn.Parameter(rng.normal((tokens, width), std=width ** -0.5, dtype=dtype))
        else:                                 # fixed: a constant array, neither trained nor saved
            table = sincos_position_embedding(config.image_size // patch, width, config.class_token)
            self.position_embedding = backend.asarray(table, init["backend"], dtype)   # (tokens, W)
        if config.vision_pre_norm:
            self.ln_pre = nn.LayerNorm(width, config.ln_eps, **init)
        self.transformer = nn.Transformer(width, config.vision_layers, config.vision_heads, config.vision_mlp_ratio,
                                          config.activation, causal=False, eps=config.ln_eps, **init)
        self.ln_post = nn.LayerNorm(width, config.ln_eps, **init)
        if config.vision_pooling == "map":
            self.head = AttentionPoolingHead(config, **init)
        if config.vision_projection:
            self.proj = nn.Linear(width, config.embed_dim, bias=False, **init)

    def patchify(self, images):
        """(B, H, W, 3) → (B, N, P·P·3), patches in row-major order, each flattened as (P, P, 3)."""
        config = self.config
        shape = _checked_image_shape(images, config)
        batch, patch = shape[0], config.patch_size
        grid = config.image_size // patch
        x = F.reshape(images, (batch, grid, patch, grid, patch, 3))        # (B, gy, P, gx, P, 3)
        x = F.permute(x, (0, 1, 3, 2, 4, 5))                               # (B, gy, gx, P, P, 3)
        return F.reshape(x, (batch, grid * grid, patch * patch * 3))       # (B, N, P·P·3)

    def forward(self, images):
        config = self.config
        x = self.patch_embed(self.patchify(images))                        # (B, N, W)
        batch, _, width = x.shape
        if config.class_token:
            cls = F.broadcast_to(F.reshape(self.class_embedding, (1, 1, width)), (batch, 1, width))
            x = F.concatenate([cls, x], axis=1)                            # (B, 1 + N, W)
        x = x + self.position_embedding
        if config.vision_pre_norm:
            x = self.ln_pre(x)
        x = self.transformer(x)
        if config.vision_pooling == "cls":
            pooled = self.ln_post(x[:, 0, :])                              # (B, W): CLIP norms only the class token
        else:
            x = self.ln_post(x)
            pooled = F.mean(x, axis=1) if config.vision_pooling == "gap" else self.head(x)   # (B, W)
        return self.proj(pooled) if config.vision_projection else pooled


class ConvTower(nn.Module):
    """Images (B, H, W, 3) float → image features (B, embed_dim): [conv 3×3/2 → batch norm → act] × n → mean → proj."""

    def __init__(self, config, **init):
        super().__init__()
        self.config = config
        stages, channels_in = [], 3
        for channels in config.conv_channels:
            stages.append(ConvStage(channels_in, channels, config.activation, **init))
            channels_in = channels
        self.stages = stages
        if config.vision_projection:
            self.proj = nn.Linear(channels_in, config.embed_dim, bias=False, std=channels_in ** -0.5, **init)

    def forward(self, images):
        config = self.config
        _checked_image_shape(images, config)
        x = images
        for stage in self.stages:
            x = stage(x)                                                   # (B, H/2, W/2, C)
        pooled = F.mean(x, axis=(1, 2))                                    # (B, C): average over positions
        return self.proj(pooled) if config.vision_projection else pooled


class ConvStage(nn.Module):
    """x → act(batch_norm(conv 3×3, stride 2, padding 1 (x))): half the side, ``channels_out`` channels."""

    def __init__(self, channels_in, channels_out, activation, **init):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1, bias=False, **init)
        self.norm = nn.BatchNorm(channels_out, **init)
        self.act = nn.ACTIVATIONS[activation]

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


# ---------------------------------------------------------------------------------
# Position embeddings at another resolution
# ---------------------------------------------------------------------------------

BICUBIC_A = -0.75    # Keys' cubic convolution parameter, the one PyTorch's (and OpenCV's) bicubic uses


def _cubic_weights(t, a=BICUBIC_A):
    """Keys' cubic convolution weights of the taps at offsets -1, 0, +1, +2 from a point t in [0, 1) past tap 0.

    k(x) = (a+2)|x|³ - (a+3)|x|² + 1 for |x| <= 1,  a|x|³ - 5a|x|² + 8a|x| - 4a for 1 < |x| < 2
    (Keys 1981, "Cubic convolution interpolation for digital image processing").
    """
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(xp, size_in, size_out, dtype):
    """(size_out, size_in): one axis of PyTorch's ``interpolate(mode="bicubic", align_corners=False)``.

    Output sample i reads the input at x = (i + 0.5)·size_in/size_out - 0.5
    (pixel centres aligned, x not clamped below 0 for cubic, as in PyTorch's
    ``area_pixel_compute_source_index``); the four taps around it are clamped
    to the edge, so an edge sample's weight piles onto the border. There is no
    antialiasing: a shrink samples the cubic, it does not average.
    """
    matrix = numpy.zeros((size_out, size_in), dtype=numpy.float64)
    scale = size_in / size_out
    for i in range(size_out):
        x = (i + 0.5) * scale - 0.5
        start = int(numpy.floor(x))
        for offset, weight in zip((-1, 0, 1, 2), _cubic_weights(x - start)):
            matrix[i, min(max(start + offset, 0), size_in - 1)] += weight
    return xp.asarray(matrix.astype(dtype))


def resize_position_embedding(position_embedding, grid_in, grid_out, class_token):
    """ViT position embeddings for another patch grid: (prefix + grid_in², W) → (prefix + grid_out², W).

    The grid part is resized bicubically, separably along rows then columns,
    exactly as transformers' ``interpolate_pos_encoding`` does (PyTorch's
    ``interpolate(..., mode="bicubic", align_corners=False)``, no antialias);
    the class token's embedding (``class_token``: one row before the grid) is
    kept as it is. open_clip's ``resize_pos_embed`` antialiases by default
    when shrinking, and so differs from this. Works on NumPy and CuPy arrays;
    raises ValueError when the rows do not form the square grid_in².
    """
    xp = backend.get_array_module(position_embedding)
    prefix = 1 if class_token else 0
    rows, width = position_embedding.shape
    if rows != prefix + grid_in * grid_in:
        raise ValueError(f"position embedding has {rows} rows; a {grid_in}x{grid_in} patch grid"
                         f"{' and a class token' if class_token else ''} needs {prefix + grid_in * grid_in}")
    if grid_out == grid_in:
        return position_embedding.copy()
    grid = position_embedding[prefix:].reshape(grid_in, grid_in, width)        # (gy, gx, W)
    matrix = bicubic_matrix(xp, grid_in, grid_out, position_embedding.dtype)   # (g_out, g_in)
    grid = xp.einsum("yi,ijw->yjw", matrix, grid)                              # rows: (g_out, gx, W)
    grid = xp.einsum("xj,yjw->yxw", matrix, grid)                              # columns: (g_out, g_out, W)
    return xp.concatenate([position_embedding[:prefix], grid.reshape(grid_out * grid_out, width)])
