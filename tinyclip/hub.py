"""Published models in and out: open_clip checkpoints in, Hugging Face folders out.

``load_model`` reads any model folder tinyclip knows: its own, a Hugging Face
CLIP / SigLIP one (both through ``checkpoint.from_pretrained``), or an
open_clip one, the layout open_clip publishes on the Hugging Face Hub:
``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) and
``open_clip_model.safetensors`` (the state dict of open_clip's ``CLIP`` or
``CustomTextCLIP``). open_clip's own towers are translated: its
``VisionTransformer`` (class-token pooling) and ``TextTransformer``, with
OpenAI's QuickGELU or exact GELU, causal or not, with the CLIP loss or the
SigLIP one (``init_logit_bias``). Towers open_clip borrows from other
libraries (timm image towers, Hugging Face text towers) and its ResNets are
refused with the reason: their weights follow those libraries' layouts.

``export_hf`` writes a model back as a Hugging Face ``CLIPModel`` or
``SiglipModel`` folder, with its tokenizer, so that transformers'
``from_pretrained`` and processors load it and give the same embeddings.

Weights are read and written with the ``safetensors`` package; pickled files
(``open_clip_pytorch_model.bin``, ``.pt``) are refused, never unpickled.
"""

import json
import os

import numpy

from . import backend as _backend
from . import checkpoint, files, nn
from .models import CLIP, CLIPConfig
from .models.config import CLIP_INIT_LOG_SCALE
from .tokenizer import SPIECE_FILE, SiglipTokenizer, Tokenizer

# what to say of a model folder that is not there (a published model's name, say)
NO_SUCH_FOLDER = ("no such model folder (nothing is downloaded: give the folder of a model you have, e.g. one "
                  "fetched with huggingface-cli download)")

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
# the means and standard deviations open_clip's preprocess_cfg gives for each of tinyclip's normalisations
OPEN_CLIP_NORMALIZATIONS = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                            "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def load_model(path, dtype=None, backend=None, image_size=None):
    """A CLIP from any model folder: tinyclip's, Hugging Face CLIP / SigLIP, or open_clip's.

    ``image_size`` rebuilds a ViT for that input side (``checkpoint.at_image_size``).
    Raises FileNotFoundError for a missing folder and ValueError, naming the
    file and field, for anything that cannot be read or translated.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.lower().endswith(checkpoint.PICKLE_SUFFIXES):
        refuse_pickle(path)
    if not os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG)):
        return checkpoint.from_pretrained(path, dtype=dtype, backend=backend, image_size=image_size)
    return checkpoint.at_image_size(from_open_clip(path, dtype=dtype, backend=backend), image_size, where=path)


def refuse_pickle(path):
    raise ValueError(f"{path} is a pickle file (PyTorch .bin/.pt). Reading it could run arbitrary code, so "
                     f"tinyclip never unpickles files; open_clip publishes {OPEN_CLIP_WEIGHTS} beside it, or "
                     f"convert it with safetensors.torch.save_file after torch.load(..., weights_only=True)")


def read_weights(path):
    """``{name: float NumPy array}`` from a safetensors file (``checkpoint.read_safetensors``: the
    ``safetensors`` package, memory-mapped and validating); FileNotFoundError or a ValueError naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights file {path}")
    return checkpoint.read_safetensors(path)


# ---------------------------------------------------------------------------------
# open_clip in
# ---------------------------------------------------------------------------------

# open_clip's CLIPVisionCfg / CLIPTextCfg fields (open_clip/model.py) that tinyclip reproduces, with the value
# each must have when it cannot express any other: one place to read what is supported
_OPEN_CLIP_VISION_FIXED = {"ls_init_value": None, "attentional_pool": False, "pos_embed_type": "learnable",
                           "pool_type": "tok", "act_kwargs": None, "block_type": None, "qk_norm": False,
                           "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                           "scale_attn": False, "scale_fc": False}
_OPEN_CLIP_TEXT_FIXED = {"ls_init_value": None, "embed_cls": False, "proj_type": "linear", "act_kwargs": None,
                         "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                         "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "hf_model_name": None}
# fields that change nothing tinyclip computes at inference (training-time patch dropout, the tokenizer's name,
# the pretrained-init switches of borrowed towers, output options)
_OPEN_CLIP_IGNORED = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads",
                      "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                      "timm_drop_path", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "pad_id",
                      "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "final_ln_after_pool"}
_OPEN_CLIP_DEFAULTS = {
    "vision_cfg": {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                   "image_size": 224, "no_ln_pre": False, "norm_kwargs": None, "timm_model_name": None,
                   **_OPEN_CLIP_VISION_FIXED},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                 "mlp_ratio": 4.0, "eos_id": 2, "no_causal_mask": False, "pool_type": "argmax", "proj_bias": False,
                 "norm_kwargs": None, **_OPEN_CLIP_TEXT_FIXED},
}
_OPEN_CLIP_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                  "nonscalar_logit_scale", "custom_text", "cast_dtype"}


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _layer_norm_eps(settings, tower, problems):
    kwargs = settings["norm_kwargs"] or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"eps"}:
        problems.append(f"{tower}.norm_kwargs {kwargs!r}: only 'eps' is supported")
        return 1e-5
    return kwargs.get("eps", 1e-5)


def _normalization(preprocess):
    """tinyclip's pixel_norm for an open_clip preprocess_cfg (missing mean/std: open_clip's OpenAI defaults)."""
    mean = tuple(preprocess.get("mean", OPEN_CLIP_NORMALIZATIONS["clip"][0]))
    std = tuple(preprocess.get("std", OPEN_CLIP_NORMALIZATIONS["clip"][1]))
    for name, (known_mean, known_std) in OPEN_CLIP_NORMALIZATIONS.items():
        if numpy.allclose(mean, known_mean, atol=1e-6) and numpy.allclose(std, known_std, atol=1e-6):
            return name
    raise ValueError(f"preprocess_cfg mean {mean} / std {std}: tinyclip normalises pixels as CLIP "
                     f"{OPEN_CLIP_NORMALIZATIONS['clip']} or SigLIP {OPEN_CLIP_NORMALIZATIONS['siglip']} only")


def config_from_open_clip(document):
    """The CLIPConfig of an open_clip_config.json document (a dict); one ValueError names every misfit."""
    model_cfg = document.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ValueError("'model_cfg' must be an object (open_clip's model config)")
    problems = [f"model_cfg.{key} is not an open_clip CLIP field tinyclip knows" for key in model_cfg
                if key not in _OPEN_CLIP_TOP]
    towers = {}
    for tower in ("vision_cfg", "text_cfg"):
        given = model_cfg.get(tower)
        if not isinstance(given, dict):
            raise ValueError(f"model_cfg.{tower} must be an object")
        unknown = sorted(set(given) - set(_OPEN_CLIP_DEFAULTS[tower]) - _OPEN_CLIP_IGNORED)
        problems += [f"model_cfg.{tower}.{key} is not a field tinyclip knows" for key in unknown]
        towers[tower] = {**_OPEN_CLIP_DEFAULTS[tower], **given}
    vision, text = towers["vision_cfg"], towers["text_cfg"]
    if vision["timm_model_name"]:
        raise ValueError(f"model_cfg.vision_cfg.timm_model_name is {vision['timm_model_name']!r}: this image "
                         f"tower is a timm model, whose weights follow timm's layout, not open_clip's own "
                         f"VisionTransformer; tinyclip imports only open_clip's own towers")
    if text["hf_model_name"]:
        raise ValueError(f"model_cfg.text_cfg.hf_model_name is {text['hf_model_name']!r}: this text tower is a "
                         f"Hugging Face model; tinyclip imports only open_clip's own TextTransformer")
    if isinstance(vision["layers"], (list, tuple)):
        raise ValueError("model_cfg.vision_cfg.layers is a list: this image tower is open_clip's ModifiedResNet, "
                         "which tinyclip does not implement")
    for tower, settings in towers.items():
        fixed = _OPEN_CLIP_VISION_FIXED if tower == "vision_cfg" else _OPEN_CLIP_TEXT_FIXED
        problems += [f"model_cfg.{tower}.{key} is {settings[key]!r}; tinyclip supports only {value!r}"
                     for key, value in fixed.items() if settings[key] != value]
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            problems.append(f"model_cfg.vision_cfg.image_size {image_size}: tinyclip takes square images")
        image_size = image_size[0] if image_size else 0
    for key, value in (("vision_cfg.width", vision["width"]), ("vision_cfg.layers", vision["layers"]),
                       ("vision_cfg.head_width", vision["head_width"]), ("vision_cfg.image_size", image_size),
                       ("vision_cfg.patch_size", patch_size), ("text_cfg.width", text["width"]),
                       ("text_cfg.heads", text["heads"]), ("text_cfg.layers", text["layers"]),
                       ("text_cfg.context_length", text["context_length"]),
                       ("text_cfg.vocab_size", text["vocab_size"]), ("embed_dim", model_cfg.get("embed_dim"))):
        if not _positive_int(value):
            problems.append(f"model_cfg.{key} must be a positive integer, got {value!r}")
    if text["pool_type"] not in ("argmax", "eos", "last"):
        problems.append(f"model_cfg.text_cfg.pool_type {text['pool_type']!r}: tinyclip pools text at "
                        f"'argmax', 'eos' or 'last'")
    vision_eps = _layer_norm_eps(vision, "vision_cfg", problems)
    text_eps = _layer_norm_eps(text, "text_cfg", problems)
    if vision_eps != text_eps:
        problems.append(f"layer-norm eps differs between towers (vision {vision_eps}, text {text_eps}); "
                        f"tinyclip has one")
    try:
        pixel_norm = _normalization(document.get("preprocess_cfg") or {})
    except (TypeError, ValueError) as error:
        problems.append(str(error))
        pixel_norm = None
    if problems:
        raise ValueError("; ".join(problems))
    bias = model_cfg.get("init_logit_bias")
    vision_heads = vision["width"] // vision["head_width"]
    try:
        return CLIPConfig(
            image_size=image_size, patch_size=patch_size, vision_width=vision["width"],
            vision_layers=vision["layers"], vision_heads=vision_heads, vision_mlp_ratio=float(vision["mlp_ratio"]),
            class_token=True, vision_pre_norm=not vision["no_ln_pre"], patch_bias=False, vision_pooling="cls",
            vision_projection=True, context_length=text["context_length"], vocab_size=text["vocab_size"],
            text_width=text["width"], text_layers=text["layers"], text_heads=text["heads"],
            text_mlp_ratio=float(text["mlp_ratio"]), causal=not text["no_causal_mask"],
            text_pooling=text["pool_type"],
            eos_id=text["eos_id"] if text["pool_type"] == "eos" else text["vocab_size"] - 1,
            text_projection_bias=bool(text["proj_bias"]), embed_dim=model_cfg["embed_dim"],
            activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", ln_eps=float(vision_eps),
            init_log_scale=float(model_cfg.get("init_logit_scale", CLIP_INIT_LOG_SCALE)),
            init_bias=None if bias is None else float(bias), pixel_norm=pixel_norm)
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from None


# tinyclip's block parts -> open_clip's ResidualAttentionBlock parts
_OPEN_CLIP_BLOCK = {"ln1": "ln_1", "ln2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "attn.out_proj": "attn.out_proj"}


def open_clip_name(name, custom_text):
    """open_clip's key for tinyclip's parameter ``name`` and how it is stored: (key, kind).

    kind: 'copy'; 'patch' (conv1's (W, 3, P, P) kernel); 'transpose' (open_clip
    keeps projections as (in, out) matrices used as ``x @ proj``); 'q', 'k',
    'v' (thirds of PyTorch MultiheadAttention's packed in_proj).
    """
    text = "text." if custom_text else ""        # CustomTextCLIP keeps the text tower as a submodule
    tower, _, rest = name.partition(".")
    if name in ("log_scale", "bias"):
        return {"log_scale": "logit_scale", "bias": "logit_bias"}[name], "scalar"
    prefix = "visual." if tower == "visual" else text
    if rest.startswith("transformer.blocks."):
        _, _, index, part = rest.split(".", 3)
        block = f"{prefix}transformer.resblocks.{index}."
        if part.startswith(("attn.q_proj.", "attn.k_proj.", "attn.v_proj.")):
            kind, leaf = part[5], part.rsplit(".", 1)[1]
            return f"{block}attn.in_proj_{leaf}", kind
        module, leaf = part.rsplit(".", 1)
        return f"{block}{_OPEN_CLIP_BLOCK[module]}.{leaf}", "copy"
    table = {"visual.patch_embed.weight": ("visual.conv1.weight", "patch"),
             "visual.class_embedding": ("visual.class_embedding", "copy"),
             "visual.position_embedding": ("visual.positional_embedding", "copy"),
             "visual.proj.weight": ("visual.proj", "transpose"),
             "text.token_embedding.weight": (f"{text}token_embedding.weight", "copy"),
             "text.position_embedding": (f"{text}positional_embedding", "copy"),
             "text.proj.bias": (f"{text}text_projection.bias", "copy")}
    if name in table:
        return table[name]
    if name == "text.proj.weight":   # an nn.Linear (out, in) with a bias, else an (in, out) matrix
        return None, None
    module, leaf = rest.rsplit(".", 1)          # ln_pre, ln_post, ln_final
    return f"{prefix}{module}.{leaf}", "copy"


def state_from_open_clip(open_clip_state, model, custom_text):
    """tinyclip's state dict for ``model`` from open_clip's; one ValueError names every missing or mis-shaped key."""
    config = model.config
    state, used, missing, mismatched = {}, set(), [], []
    for name, parameter in model.named_parameters():
        key, kind = open_clip_name(name, custom_text)
        if name == "text.proj.weight":
            prefix = "text." if custom_text else ""
            key = f"{prefix}text_projection" + (".weight" if config.text_projection_bias else "")
            kind = "copy" if config.text_projection_bias else "transpose"
        if key not in open_clip_state:
            missing.append(key)
            continue
        used.add(key)
        array = open_clip_state[key]
        if kind == "patch":
            expected = (parameter.shape[0], 3, config.patch_size, config.patch_size)
        elif kind == "transpose":
            expected = tuple(reversed(parameter.shape))
        elif kind in ("q", "k", "v"):
            expected = (3 * parameter.shape[0],) + tuple(parameter.shape[1:])
        else:
            expected = tuple(parameter.shape)
        if kind == "scalar":
            if array.size != 1 or array.ndim > 1:
                mismatched.append(f"{key}: checkpoint {tuple(array.shape)} vs model () or (1,)")
                continue
        elif tuple(array.shape) != expected:
            mismatched.append(f"{key}: checkpoint {tuple(array.shape)} vs model {expected}")
            continue
        if kind == "transpose":
            array = array.T
        elif kind in ("patch", "q", "k", "v"):
            array = checkpoint.from_hf_array(array, kind, parameter.shape)
        state[name] = numpy.ascontiguousarray(array).reshape(parameter.shape)
    unexpected = sorted(key for key in open_clip_state if key not in used)
    problems = nn.key_problems(sorted(set(missing)), unexpected, mismatched)
    if problems:
        raise ValueError("the open_clip weights do not fit the model built from their config\n  "
                         + "\n  ".join(problems))
    return state


def from_open_clip(folder, dtype=None, backend=None):
    """A CLIP from an open_clip folder (open_clip_config.json + open_clip_model.safetensors).

    Weights are converted to ``dtype`` (default: the backend's default float
    type). Raises ValueError naming the file and every field or key that
    does not fit, FileNotFoundError when a file is missing.
    """
    folder = os.fspath(folder)
    config_path, weights_path = os.path.join(folder, OPEN_CLIP_CONFIG), os.path.join(folder, OPEN_CLIP_WEIGHTS)
    document = _read_json(config_path)
    try:
        config = config_from_open_clip(document)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    if not os.path.isfile(weights_path):
        pickles = sorted(name for name in os.listdir(folder) if name.lower().endswith(checkpoint.PICKLE_SUFFIXES))
        if pickles:
            refuse_pickle(os.path.join(folder, pickles[0]))
        raise FileNotFoundError(f"{folder} has no {OPEN_CLIP_WEIGHTS}")
    weights = read_weights(weights_path)
    model = CLIP(config, dtype=dtype, backend=backend)
    try:
        model.load_state_dict(state_from_open_clip(weights, model, bool(document["model_cfg"].get("custom_text"))))
    except ValueError as error:
        raise ValueError(f"{weights_path}: {error}") from None
    return model


def _read_json(path):
    """The JSON object in ``path``, read as every file from outside is (``tinyclip.files``: a regular file,
    size capped, nesting bounded); FileNotFoundError or a ValueError naming the file."""
    try:
        document = files.read_json(path, what="config file")
    except FileNotFoundError:
        raise FileNotFoundError(f"no config file {path}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(document).__name__}")
    return document


# ---------------------------------------------------------------------------------
# Hugging Face out
# ---------------------------------------------------------------------------------

# the CLIPConfig switches that make a model one of transformers' two architectures (checkpoint.config_from_hf
# reads them back): a tinyclip model is exported as the one whose switches it has
HF_ARCHITECTURES = {
    "clip": {"class_token": True, "vision_pre_norm": True, "patch_bias": False, "vision_pooling": "cls",
             "vision_projection": True, "causal": True, "text_projection_bias": False},
    "siglip": {"class_token": False, "vision_pre_norm": False, "patch_bias": True, "vision_pooling": "map",
               "vision_projection": False, "causal": False, "text_pooling": "last", "text_projection_bias": True},
}
_HF_ACTIVATION_NAMES = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                        "relu": "relu"}


def hf_architecture(config):
    """'clip' (transformers' CLIPModel) or 'siglip' (SiglipModel) for ``config``; a ValueError says why neither."""
    if config.vision_type != "vit":
        raise ValueError(f"the image tower is a {config.vision_type!r} tower: transformers' CLIPModel and "
                         f"SiglipModel have only Vision Transformer image towers, so it cannot be exported")
    misfits = {}
    for architecture, switches in HF_ARCHITECTURES.items():
        misfits[architecture] = [f"{name}={getattr(config, name)!r} (needs {value!r})"
                                 for name, value in switches.items() if getattr(config, name) != value]
        if architecture == "clip" and config.text_pooling not in ("argmax", "eos"):
            misfits[architecture].append(f"text_pooling={config.text_pooling!r} (needs 'argmax' or 'eos')")
        if not misfits[architecture]:
            return architecture
    raise ValueError("this model fits neither of transformers' architectures: as CLIPModel "
                     + ", ".join(misfits["clip"]) + "; as SiglipModel " + ", ".join(misfits["siglip"]))


def hf_config(config, architecture, tokenizer):
    """The Hugging Face config.json document for ``config`` exported as ``architecture``."""
    activation = _HF_ACTIVATION_NAMES[config.activation]
    vision = {"hidden_size": config.vision_width, "intermediate_size": _mlp_width(config, "vision"),
              "num_hidden_layers": config.vision_layers, "num_attention_heads": config.vision_heads,
              "num_channels": 3, "image_size": config.image_size, "patch_size": config.patch_size,
              "hidden_act": activation, "layer_norm_eps": config.ln_eps}
    text = {"vocab_size": config.vocab_size, "hidden_size": config.text_width,
            "intermediate_size": _mlp_width(config, "text"), "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.text_heads, "max_position_embeddings": config.context_length,
            "hidden_act": activation, "layer_norm_eps": config.ln_eps}
    if architecture == "clip":
        # transformers pools at argmax(ids) only for the legacy eos_token_id 2 (checkpoint.config_from_hf)
        eos = 2 if config.text_pooling == "argmax" else config.eos_id
        text.update(eos_token_id=eos, bos_token_id=getattr(tokenizer, "sot_id", 0), pad_token_id=tokenizer.eot_id,
                    projection_dim=config.embed_dim)
        vision.update(projection_dim=config.embed_dim)
        return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": config.embed_dim,
                "logit_scale_init_value": config.init_log_scale, "text_config": text, "vision_config": vision}
    text.update(projection_size=config.embed_dim, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id)
    vision.update(vision_use_head=True)
    return {"model_type": "siglip", "architectures": ["SiglipModel"], "text_config": text, "vision_config": vision}


def _mlp_width(config, tower):
    width, ratio = (config.vision_width, config.vision_mlp_ratio) if tower == "vision" else \
        (config.text_width, config.text_mlp_ratio)
    return int(width * ratio)


def hf_state(model, architecture):
    """``{Hugging Face key: NumPy array}`` of ``model`` in the layout of ``architecture`` (checkpoint.hf_name)."""
    config = model.config
    state, packed = {}, {}
    for name, parameter in model.named_parameters():
        if name == "bias" and architecture == "clip":
            continue                                    # CLIPModel has no logit_bias (export_hf reports it)
        array = _backend.to_numpy(parameter.data)
        key = checkpoint.hf_name(name, architecture)
        kind, shape = checkpoint.hf_layout(name, parameter.shape, config)
        if kind == "scalar":
            shape = (1,) if architecture == "siglip" else ()     # SiglipModel keeps its scalars as (1,)
        elif kind == "patch":                              # (W, P·P·3) -> (W, P, P, 3) -> (W, 3, P, P)
            patch = config.patch_size
            array = array.reshape(array.shape[0], patch, patch, 3).transpose(0, 3, 1, 2)
        elif kind in ("q", "k", "v"):                    # packed back into one in_proj, rows q then k then v
            packed.setdefault(key, {})[kind] = array
            continue
        state[key] = numpy.ascontiguousarray(array).reshape(shape)
    for key, parts in packed.items():
        state[key] = numpy.concatenate([parts["q"], parts["k"], parts["v"]])
    if architecture == "siglip" and model.bias is None:
        state["logit_bias"] = numpy.zeros(1, dtype=_backend.to_numpy(model.log_scale.data).dtype)
    return state


def hf_tokenizer_files(tokenizer, architecture, context_length):
    """``{file name: bytes}``: the tokenizer in the files transformers' tokenizers read."""
    if isinstance(tokenizer, SiglipTokenizer):
        settings = {"tokenizer_class": "SiglipTokenizer", "model_max_length": context_length,
                    "do_lower_case": tokenizer.lowercase, "eos_token": "</s>", "pad_token": "</s>",
                    "unk_token": tokenizer.unk_piece}
        return {SPIECE_FILE: tokenizer.model_proto, "tokenizer_config.json": _json_bytes(settings)}
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"cannot export a {type(tokenizer).__name__}; tinyclip exports its BPE Tokenizer and "
                         f"SigLIP's SentencePiece one")
    if architecture == "siglip":
        raise ValueError("a SiglipModel reads the text at its last position, so its padding must be exactly "
                         "tinyclip's (id 0 after the end token), which transformers' CLIP tokenizer cannot "
                         "reproduce (it pads with a token); export SigLIP-architecture models with a "
                         "SentencePiece tokenizer")
    vocab = {symbol: index for index, symbol in tokenizer.decoder.items()}
    merges = "#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in tokenizer.merges)
    # OpenAI's CLIP settings: <|endoftext|> stands in for unknown symbols and pads (after the end of text, which
    # the causal text tower never looks past)
    settings = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    return {"vocab.json": _json_bytes(vocab), "merges.txt": merges.encode("utf-8"),
            "tokenizer_config.json": _json_bytes(settings)}


def hf_preprocessor_config(config, architecture):
    """preprocessor_config.json: transformers' image processor with the model's size and pixel normalisation."""
    mean, std = OPEN_CLIP_NORMALIZATIONS[config.image_normalization]
    common = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
              "image_std": list(std), "resample": 3, "do_resize": True}
    if architecture == "clip":   # shorter side to the size, then the central square, as tinyclip's "clip" does
        return {"image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": config.image_size},
                "do_center_crop": True, "crop_size": {"height": config.image_size, "width": config.image_size},
                "do_convert_rgb": True}
    return {"image_processor_type": "SiglipImageProcessor", **common,
            "size": {"height": config.image_size, "width": config.image_size}}


def export_hf(model, tokenizer, out):
    """Write ``model`` and ``tokenizer`` as a Hugging Face folder at ``out``, atomically; returns notes to print.

    The folder holds config.json, model.safetensors, the tokenizer's files and
    preprocessor_config.json: transformers' ``CLIPModel`` / ``SiglipModel``
    (``hf_architecture`` picks one) and ``AutoProcessor`` load it. Raises
    ValueError, with the reason, for a model neither architecture expresses.
    """
    import safetensors.numpy
    config = model.config
    architecture = hf_architecture(config)
    if int(config.vision_width * config.vision_mlp_ratio) != config.vision_width * config.vision_mlp_ratio or \
            int(config.text_width * config.text_mlp_ratio) != config.text_width * config.text_mlp_ratio:
        raise ValueError("an MLP ratio does not give a whole hidden width; transformers stores intermediate_size")
    files = hf_tokenizer_files(tokenizer, architecture, config.context_length)
    notes = [f"exported as transformers' {'CLIPModel' if architecture == 'clip' else 'SiglipModel'}"]
    document = hf_config(config, architecture, tokenizer)
    if architecture == "clip" and model.bias is not None:
        bias = float(_backend.to_numpy(model.bias.data))
        document["tinyclip_logit_bias"] = bias
        notes.append(f"CLIPModel has no logit bias: the SigLIP-loss bias {bias:.6g} is kept in config.json as "
                     f"tinyclip_logit_bias, and transformers' logits_per_image lack it")
    if architecture == "siglip" and model.bias is None:
        notes.append("SiglipModel needs a logit bias: written as 0, so its logits equal this model's")
    with checkpoint.staged_folder(out) as staging:
        checkpoint.write_json(os.path.join(staging, "config.json"), document)
        checkpoint.write_json(os.path.join(staging, "preprocessor_config.json"),
                              hf_preprocessor_config(config, architecture))
        safetensors.numpy.save_file(hf_state(model, architecture), os.path.join(staging, "model.safetensors"),
                                    metadata={"format": "pt"})
        for name, data in files.items():
            with open(os.path.join(staging, name), "wb") as file:
                file.write(data)
    return notes


def _json_bytes(document):
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def model_family(path):
    """'clip' or 'siglip' (the loss it was trained with) of the model folder ``path``, from its config alone.

    Reads no weights, so that a training configuration can settle its loss
    before anything is loaded. Raises ValueError naming the file at fault.
    """
    return model_config(path).family


def model_config(path):
    """The CLIPConfig of the model folder ``path`` (tinyclip, Hugging Face or open_clip), from its config alone;
    reads no weights. Raises ValueError naming the file at fault."""
    path = os.fspath(path)
    open_clip_config = os.path.join(path, OPEN_CLIP_CONFIG)
    config_path = open_clip_config if os.path.isfile(open_clip_config) else os.path.join(path, "config.json")
    document = _read_json(config_path)
    try:
        if config_path == open_clip_config:
            return config_from_open_clip(document)
        if "tinyclip_format" in document:
            return CLIPConfig.from_dict(document.get("config") or {})
        return checkpoint.config_from_hf(document)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: {error}") from None
