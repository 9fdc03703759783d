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
import numbers

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu")
VISION_POOLING = ("cls", "gap", "map")
VISION_TYPES = ("vit", "cnn")
POSITION_EMBEDDINGS = ("learned", "sincos")
ATTENTION_INITS = ("random", "mimetic")
# the fields that decide what the image tower computes: a tower moved into another model brings them along
# (activation and ln_eps are shared with the text tower, which then follows the image tower's)
VISION_FIELDS = ("vision_type", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                 "vision_mlp_ratio", "class_token", "vision_pre_norm", "patch_bias", "vision_pooling",
                 "vision_projection", "conv_channels", "embed_dim", "activation", "ln_eps",
                 "position_embedding")
TEXT_POOLING = ("argmax", "eos", "last")
PIXEL_NORMS = (None, "clip", "siglip")

# The loss's learned temperature and bias at initialisation (section 3.2 of the SigLIP paper, Zhai et al. 2023:
# t' = log 10 and b = -10 offset the many easy negatives of the sigmoid loss); CLIP starts at t = 1/0.07
# (Radford et al. 2021) and has no bias. Every preset, importer and trainer takes them from here.
CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0

# Sane upper bounds: a config from a file is checked against them before a model is built from it. They are
# far above every published CLIP / SigLIP (ViT-bigG: width 1664, 48 layers; SigLIP so400m: 27 layers, 1152)
MAX_WIDTH = 16384          # vision_width, text_width, embed_dim and each of conv_channels
MAX_LAYERS = 512           # vision_layers, text_layers, and the stages of a CNN tower
MAX_IMAGE_SIZE = 8192      # pixels
MAX_CONTEXT_LENGTH = 65536
MAX_VOCAB_SIZE = 1 << 22   # 4,194,304 ids; SigLIP's multilingual vocabulary has 250,000
MAX_MLP_RATIO = 64.0


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
    vision_attention_init: str = "random"   # "random" (CLIP's stds) or "mimetic": each head starts attending to
                                            # tokens like its own (Trockman & Kolter 2023; nn.mimetic_init)
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
    init_log_scale: float = CLIP_INIT_LOG_SCALE   # t' at initialisation: scale = exp(t') (SigLIP: log 10)
    init_bias: float | None = None   # the SigLIP loss bias at initialisation (-10); None for CLIP (no bias)
    pixel_norm: str | None = None    # the image normalisation, "clip" or "siglip"; None: the family's

    def __post_init__(self):
        object.__setattr__(self, "conv_channels", _as_tuple(self.conv_channels))   # JSON gives a list
        problems = _type_problems(self)
        if problems:             # the checks below compare numbers: only run them on fields of the right types
            raise ValueError("CLIPConfig: " + "; ".join(problems))
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                problems.append(f"{name} {value!r} is outside [{low}, {high}]")
        for name in ("init_log_scale", "init_bias"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                problems.append(f"{name} {value!r} is not a finite number")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {choices}")
        if problems:             # the relations below assume every field in its range
            raise ValueError("CLIPConfig: " + "; ".join(problems))
        if self.vision_type == "cnn":
            if not self.conv_channels:
                problems.append("vision_type 'cnn' needs conv_channels, a non-empty tuple of positive ints, "
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
        for tower in ("vision", "text"):
            width, ratio = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_mlp_ratio")
            if int(width * ratio) < 1:
                problems.append(f"{tower}_mlp_ratio {ratio} gives an MLP of no width at {tower}_width {width}")
        if self.position_embedding == "sincos" and self.vision_width % 4:
            problems.append(f"position_embedding 'sincos' needs vision_width divisible by 4, got {self.vision_width}")
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
        if not isinstance(values, dict):
            raise ValueError(f"CLIPConfig: a config is a JSON object of fields, got {type(values).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"CLIPConfig: unknown fields {unknown}")
        return cls(**values)


_INT_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "context_length",
               "vocab_size", "text_width", "text_layers", "text_heads", "eos_id", "embed_dim")
_FLOAT_FIELDS = ("vision_mlp_ratio", "text_mlp_ratio", "ln_eps", "init_log_scale")
_BOOL_FIELDS = ("class_token", "vision_pre_norm", "patch_bias", "vision_projection", "causal", "text_projection_bias")
_CHOICES = {"vision_type": VISION_TYPES, "vision_pooling": VISION_POOLING, "text_pooling": TEXT_POOLING,
            "activation": ACTIVATIONS, "pixel_norm": PIXEL_NORMS, "position_embedding": POSITION_EMBEDDINGS,
            "vision_attention_init": ATTENTION_INITS}
_RANGES = {"image_size": (1, MAX_IMAGE_SIZE), "patch_size": (1, MAX_IMAGE_SIZE), "vision_width": (1, MAX_WIDTH),
           "vision_layers": (1, MAX_LAYERS), "vision_heads": (1, MAX_WIDTH), "vision_mlp_ratio": (0.0, MAX_MLP_RATIO),
           "context_length": (1, MAX_CONTEXT_LENGTH), "vocab_size": (1, MAX_VOCAB_SIZE),
           "text_width": (1, MAX_WIDTH), "text_layers": (1, MAX_LAYERS), "text_heads": (1, MAX_WIDTH),
           "text_mlp_ratio": (0.0, MAX_MLP_RATIO), "embed_dim": (1, MAX_WIDTH), "ln_eps": (1e-12, 1.0),
           "eos_id": (0, MAX_VOCAB_SIZE)}


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _type_problems(config):
    """What is of the wrong type in ``config``, one line per field."""
    problems = [f"{name} {getattr(config, name)!r} must be an integer"
                for name in _INT_FIELDS if not _is_int(getattr(config, name))]
    problems += [f"{name} {getattr(config, name)!r} must be a number" for name in _FLOAT_FIELDS
                 if not isinstance(getattr(config, name), numbers.Real) or isinstance(getattr(config, name), bool)]
    problems += [f"{name} {getattr(config, name)!r} must be true or false"
                 for name in _BOOL_FIELDS if not isinstance(getattr(config, name), bool)]
    if config.init_bias is not None and (not isinstance(config.init_bias, numbers.Real)
                                         or isinstance(config.init_bias, bool)):
        problems.append(f"init_bias {config.init_bias!r} must be a number or None")
    for name in ("vision_type", "vision_pooling", "text_pooling", "activation", "position_embedding",
                 "vision_attention_init"):
        if not isinstance(getattr(config, name), str):
            problems.append(f"{name} {getattr(config, name)!r} must be a string, one of {_CHOICES[name]}")
    if config.pixel_norm is not None and not isinstance(config.pixel_norm, str):
        problems.append(f"pixel_norm {config.pixel_norm!r} must be None or a string, one of {PIXEL_NORMS}")
    channels = config.conv_channels
    if not isinstance(channels, tuple) or len(channels) > MAX_LAYERS or not all(
            _is_int(c) and 1 <= c <= MAX_WIDTH for c in channels):
        problems.append(f"conv_channels {channels!r} must be a list of at most {MAX_LAYERS} integers "
                        f"in [1, {MAX_WIDTH}]")
    return problems


_SIGLIP = dict(class_token=False, vision_pre_norm=False, patch_bias=True, vision_pooling="map",
               vision_projection=False, causal=False, text_pooling="last", text_projection_bias=True,
               activation="gelu_tanh", ln_eps=1e-6, init_log_scale=SIGLIP_INIT_LOG_SCALE,
               init_bias=SIGLIP_INIT_BIAS)

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
                         text_heads=4, embed_dim=128, init_log_scale=SIGLIP_INIT_LOG_SCALE,
                         init_bias=SIGLIP_INIT_BIAS,
                         activation="gelu_tanh"),
    # the same with a ViT image tower of about four times the cost: on the default run it learns the
    # colours but not the shapes (README, "Training"). The cause (docs/vit.md): the linear patch embedding
    # has no translation equivariance inside a patch; with every object centred in its 8-px patch a small ViT
    # learns the shapes (0.89 in 400 probe steps), at the data's random alignments it stays at chance
    "shapes-vit": CLIPConfig(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                             context_length=16, vocab_size=1024, eos_id=1023, text_width=128, text_layers=4,
                             text_heads=4, embed_dim=128, init_log_scale=SIGLIP_INIT_LOG_SCALE,
                         init_bias=SIGLIP_INIT_BIAS,
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
