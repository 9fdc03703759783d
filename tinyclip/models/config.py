"""CLIPConfig: one dataclass that describes both families, and the named presets.

OpenAI CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023) share the
two-tower shape and differ in a handful of switches: class token or not,
pre-LN in the vision tower, pooling (class token, average, or SigLIP's
attention-pooling head), a causal text tower pooled at the end-of-text token
or a bidirectional one pooled at the last position, the activation, and a
learnable bias in the loss. Published shapes follow the model cards of
openai/clip-vit-* and google/siglip-base-patch16-224.
"""

import dataclasses
import math

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu")
VISION_POOLING = ("cls", "gap", "map")
VISION_TYPES = ("vit", "cnn")
POSITION_EMBEDDINGS = ("learned", "sincos")
# the fields that decide what the image tower computes: a tower moved into another model brings them along
# (activation and ln_eps are shared with the text tower, which then follows the image tower's)
VISION_FIELDS = ("vision_type", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                 "vision_mlp_ratio", "class_token", "vision_pre_norm", "patch_bias", "vision_pooling",
                 "vision_projection", "conv_channels", "embed_dim", "activation", "ln_eps",
                 "position_embedding")
TEXT_POOLING = ("argmax", "eos", "last")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    # --- vision tower --------------------------------------------------------------------------
    vision_type: str = "vit"         # "vit": a Vision Transformer (the fields below); "cnn": conv_channels
    image_size: int = 224            # square input side, pixels
    patch_size: int = 16             # side of a patch; image_size must be a multiple of it
    vision_width: int = 768          # token width of the vision transformer
    vision_layers: int = 12          # residual blocks
    vision_heads: int = 12           # attention heads (vision_width must divide by it)
    vision_mlp_ratio: float = 4.0    # MLP hidden width / token width
    class_token: bool = True         # prepend a learned class token (CLIP); SigLIP has none
    vision_pre_norm: bool = True     # layer norm before the first block (CLIP's ln_pre)
    patch_bias: bool = False         # bias in the patch projection (CLIP: no, SigLIP: yes)
    vision_pooling: str = "cls"      # "cls" token, "gap" average over tokens, "map" attention-pooling head
    vision_projection: bool = True   # linear map width -> embed_dim without bias (SigLIP: none)
    conv_channels: tuple = ()        # "cnn": output channels of each 3×3 stride-2 conv + batch norm stage
    position_embedding: str = "learned"   # "learned" (CLIP, SigLIP) or "sincos": fixed 2-D sine-cosine
                                          # (Chen et al. 2021, MoCo v3; Beyer et al. 2022), a zero row for a class token
    # --- text tower ------------------------------------------------------------------------------
    context_length: int = 77         # tokens per caption
    vocab_size: int = 49408          # token ids are in [0, vocab_size)
    text_width: int = 512            # token width of the text transformer
    text_layers: int = 12            # residual blocks
    text_heads: int = 8              # attention heads
    text_mlp_ratio: float = 4.0      # MLP hidden width / token width
    causal: bool = True              # each token attends only to earlier ones (CLIP); SigLIP: False
    text_pooling: str = "argmax"     # features at argmax(ids) (CLIP's end-of-text id is the largest),
                                     # the first "eos" id, or the "last" position (SigLIP)
    eos_id: int = 49407              # the end-of-text id, for text_pooling = "eos"
    text_projection_bias: bool = False   # SigLIP's text head is a linear map with bias
    # --- shared ----------------------------------------------------------------------------------
    embed_dim: int = 512             # width of the joint embedding space
    activation: str = "quick_gelu"   # "quick_gelu" (OpenAI CLIP), "gelu" (exact), "gelu_tanh" (SigLIP), "relu"
    ln_eps: float = 1e-5             # layer-norm epsilon (CLIP 1e-5, SigLIP 1e-6)
    init_log_scale: float = math.log(1 / 0.07)   # t' at initialisation: scale = exp(t') (SigLIP: log 10)
    init_bias: float | None = None   # the SigLIP loss bias at initialisation (-10); None for CLIP (no bias)
    pixel_norm: str | None = None    # the image normalisation, "clip" or "siglip"; None: the family's

    def __post_init__(self):
        object.__setattr__(self, "conv_channels", tuple(self.conv_channels))   # JSON gives a list
        problems = []
        if self.pixel_norm not in (None, "clip", "siglip"):
            problems.append(f"pixel_norm {self.pixel_norm!r} is not one of None, 'clip', 'siglip'")
        if self.vision_type not in VISION_TYPES:
            problems.append(f"vision_type {self.vision_type!r} is not one of {VISION_TYPES}")
        if self.vision_type == "cnn":
            if not self.conv_channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                                 for c in self.conv_channels):
                problems.append(f"vision_type 'cnn' needs conv_channels, a non-empty tuple of positive ints, "
                                f"got {self.conv_channels!r}")
            elif not self.vision_projection and self.conv_channels[-1] != self.embed_dim:
                problems.append(f"without a vision projection, the last of conv_channels {self.conv_channels} "
                                f"must equal embed_dim {self.embed_dim}")
        elif self.conv_channels:
            problems.append("conv_channels is for vision_type 'cnn'; a 'vit' tower has none")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads:
            problems.append(f"vision_width {self.vision_width} does not divide into {self.vision_heads} heads")
        if self.text_width % self.text_heads:
            problems.append(f"text_width {self.text_width} does not divide into {self.text_heads} heads")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            problems.append(f"position_embedding {self.position_embedding!r} is not one of {POSITION_EMBEDDINGS}")
        elif self.position_embedding == "sincos" and self.vision_width % 4:
            problems.append(f"position_embedding 'sincos' needs vision_width divisible by 4, got {self.vision_width}")
        if self.vision_pooling not in VISION_POOLING:
            problems.append(f"vision_pooling {self.vision_pooling!r} is not one of {VISION_POOLING}")
        if self.text_pooling not in TEXT_POOLING:
            problems.append(f"text_pooling {self.text_pooling!r} is not one of {TEXT_POOLING}")
        if self.vision_pooling == "cls" and not self.class_token:
            problems.append("vision_pooling 'cls' needs class_token=True")
        if self.vision_type == "vit" and not self.vision_projection and self.vision_width != self.embed_dim:
            problems.append(f"without a vision projection, vision_width {self.vision_width} must equal "
                            f"embed_dim {self.embed_dim}")
        if not 0 <= self.eos_id < self.vocab_size:
            problems.append(f"eos_id {self.eos_id} is outside the vocabulary of {self.vocab_size}")
        if problems:
            raise ValueError("CLIPConfig: " + "; ".join(problems))

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def family(self):
        """'siglip' when the loss has a bias, else 'clip'."""
        return "clip" if self.init_bias is None else "siglip"

    @property
    def image_normalization(self):
        """Whose pixel mean and std the image tower expects: ``pixel_norm``, else the family's."""
        return self.pixel_norm or self.family

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """A config from plain data; unknown keys are an error that names them."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"CLIPConfig: unknown fields {unknown}")
        return cls(**values)


_SIGLIP = dict(class_token=False, vision_pre_norm=False, patch_bias=True, vision_pooling="map",
               vision_projection=False, causal=False, text_pooling="last", text_projection_bias=True,
               activation="gelu_tanh", ln_eps=1e-6, init_log_scale=math.log(10.0), init_bias=-10.0)

PRESETS = {
    # the smallest model that exercises every part: gradient checks and fast tests
    "tiny": CLIPConfig(image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
                       context_length=8, vocab_size=64, eos_id=63, text_width=16, text_layers=1, text_heads=2,
                       embed_dim=8),
    # the speed yardstick of DESIGN.md
    "bench-tiny": CLIPConfig(image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=4,
                             context_length=32, vocab_size=4096, eos_id=4095, text_width=256, text_layers=6,
                             text_heads=4, embed_dim=256),
    # the default model of the main job: small enough to train on a CPU in minutes; 1024 ids leave room
    # for a BPE trained on its captions (CLIP's byte vocabulary alone is 512 symbols + 2 specials). Its
    # image tower is a four-stage CNN with batch norm (vision.ConvTower), 64 px -> 4 x 4 x 256 -> mean
    "shapes": CLIPConfig(vision_type="cnn", conv_channels=(32, 64, 128, 256), image_size=64,
                         context_length=16, vocab_size=1024, eos_id=1023, text_width=128, text_layers=2,
                         text_heads=4, embed_dim=128, init_log_scale=math.log(10.0), init_bias=-10.0,
                         activation="gelu_tanh"),
    # the same with a ViT image tower of about four times the cost: on the default run it learns the
    # colours but not the shapes (README, "Training"). The cause (docs/vit.md): the linear patch embedding
    # has no translation equivariance inside a patch; with every object centred in its 8-px patch a small ViT
    # learns the shapes (0.89 in 400 probe steps), at the data's random alignments it stays at chance
    "shapes-vit": CLIPConfig(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                             context_length=16, vocab_size=1024, eos_id=1023, text_width=128, text_layers=4,
                             text_heads=4, embed_dim=128, init_log_scale=math.log(10.0), init_bias=-10.0,
                             activation="gelu_tanh"),
    # published shapes (openai/clip-vit-base-patch32, -base-patch16, -large-patch14)
    "ViT-B-32": CLIPConfig(patch_size=32),
    "ViT-B-16": CLIPConfig(patch_size=16),
    "ViT-L-14": CLIPConfig(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                           text_width=768, text_heads=12, embed_dim=768),
    # google/siglip-base-patch16-224
    "siglip-base-patch16-224": CLIPConfig(patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                                          context_length=64, vocab_size=32000, eos_id=1, text_width=768,
                                          text_layers=12, text_heads=12, embed_dim=768, **_SIGLIP),
}


def preset(name, **overrides):
    """The named CLIPConfig, with any fields replaced: ``preset("tiny", vision_layers=2)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
