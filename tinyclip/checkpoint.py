"""Checkpoints: tinyclip's own format, and import of Hugging Face CLIP / SigLIP weights.

tinyclip's format is a folder with ``config.json`` (the CLIPConfig and a
format version) and ``model.safetensors`` (every parameter by its dotted
name). ``save`` writes it into a temporary folder beside the target and
swaps it in only when complete, so a crash never leaves half a checkpoint;
``load`` gives back the same bits.

``from_pretrained`` also reads a Hugging Face ``CLIPModel`` or
``SiglipModel`` folder (``config.json`` + ``model.safetensors``): the
config is translated field by field and every weight renamed through one
table (``hf_name``), its shape checked; one error names every missing,
unexpected or mis-shaped key.

Safetensors files are read and written with the ``safetensors`` package
(https://github.com/huggingface/safetensors): it validates the header (offsets
in order, inside the file and covering it exactly, shapes and dtypes known)
and memory-maps the file, so a tensor is read only when asked for. bfloat16
weights load on NumPy through ``ml_dtypes``. Pickle formats
(``pytorch_model.bin``, ``.pt``, ...) can run code when read, so they are
refused, never unpickled.

Every file of a folder is untrusted (``tinyclip.files``): only regular files
are read, JSON is capped in size and nesting, the config is validated field by
field (``CLIPConfig``), and the shapes in the weights' header are checked
against the model the config describes before a single weight is read. The
model that receives them is built without values (``CLIP(..., values=False)``),
so loading allocates the weights once and draws nothing. Every error is a
ValueError (FileNotFoundError for a missing file) that names the file and what
is wrong with it.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil

import ml_dtypes  # (importing it registers bfloat16 with NumPy, so that safetensors.numpy reads BF16 tensors)
import numpy
import safetensors
import safetensors.numpy

from . import backend as _backend
from . import files
from .files import is_leftover, staged_file      # (also reached as checkpoint.*, as before they moved)
from .models import CLIP, CLIPConfig
from .models.config import PRESETS
from .models.vision import resize_position_embedding
from .tokenizer import SPIECE_FILE, TOKENIZER_FILE, TOKENIZER_FILES, SiglipTokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"   # sharded Hugging Face checkpoints
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_CONFIG_BYTES = 2**20      # a config.json or a shard index is a few KiB (a large index ~100 KiB)


# ---------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------

# the safetensors dtypes a parameter may be stored in, and the NumPy dtype it loads as by default
_FLOAT_DTYPES = {"F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16, "BF16": numpy.float32}


def write_safetensors(path, arrays, metadata=None):
    """Write ``{name: array}`` (NumPy or CuPy; CuPy is copied to the host) as a safetensors file, flushed to disk.

    ``metadata`` values are written as strings. Raises ValueError naming an
    array whose dtype safetensors cannot store.
    """
    host = {}
    for name in sorted(arrays):
        host[name] = numpy.asarray(_to_host(arrays[name]), order="C")   # (ascontiguousarray would make 0-d 1-d)
    metadata = {str(key): str(value) for key, value in metadata.items()} if metadata else None
    try:
        safetensors.numpy.save_file(host, os.fspath(path), metadata=metadata)
    except safetensors.SafetensorError as error:
        raise ValueError(f"write_safetensors {path}: {error}") from None
    # the package writes the file with mode 0600 whatever the umask; give it the mode any file the user writes
    # gets, so that the other users of a shared machine can read a model as they could before
    os.chmod(path, 0o666 & ~files.current_umask())
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def read_safetensors(path):
    """``{name: NumPy array}`` of every tensor in a safetensors file; bfloat16 becomes float32 (exactly).

    Raises FileNotFoundError when there is no file, ValueError naming the file
    when it is not a regular file or the safetensors package refuses it.
    """
    with _open_safetensors(path) as file:
        return {name: _tensor(file, name, path) for name in file.keys()}


@contextlib.contextmanager
def _open_safetensors(path):
    """The package's memory-mapped reader of ``path`` (a regular file), its errors turned into ValueErrors."""
    path = os.fspath(path)
    files.check_regular(path, "safetensors file")
    try:
        handle = safetensors.safe_open(path, framework="numpy")
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a safetensors file the safetensors package accepts: {error}") from None
    with handle:
        yield handle


def _tensor(handle, name, path, dtype=None):
    """Tensor ``name`` from an open file as a NumPy array it owns, in ``dtype`` (bfloat16 -> float32 by default)."""
    try:
        array = handle.get_tensor(name)
    except (safetensors.SafetensorError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: tensor {name!r} cannot be read: {error}") from None
    if dtype is None and array.dtype == ml_dtypes.bfloat16:
        dtype = numpy.float32
    return array if dtype is None else array.astype(dtype, copy=False)


def _to_host(array):
    """A NumPy array from a NumPy / CuPy array or a Tensor."""
    return _backend.to_numpy(array.data if hasattr(array, "is_tensor") else array)


# ---------------------------------------------------------------------------------
# tinyclip's own format
# ---------------------------------------------------------------------------------

def save(model, path):
    """Write ``model`` to the folder ``path`` (config.json + model.safetensors), atomically.

    The files go into a temporary folder next to ``path``; only when both are
    complete and flushed does it take ``path``'s place. An existing checkpoint
    is first renamed aside and deleted only after the swap, so an exception at
    any point leaves the old checkpoint or the new one at ``path``. (A folder
    cannot be renamed over a non-empty one, so there are two renames; a crash
    between them leaves the complete old checkpoint in ``.{name}.old-*``.)
    """
    if not isinstance(model, CLIP):
        raise TypeError(f"save: expected a tinyclip.models.CLIP, got {type(model).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save: {path} exists and is not a checkpoint folder")
    with staged_folder(path) as staging:
        _write_model(model, staging)


def _write_model(model, folder):
    """config.json and model.safetensors of ``model`` into ``folder`` (a staging folder)."""
    write_json(os.path.join(folder, CONFIG_FILE), {"tinyclip_format": FORMAT_VERSION, "config": model.config.to_dict()})
    state = {key: _to_host(array) for key, array in model.state_dict().items()}
    write_safetensors(os.path.join(folder, WEIGHTS_FILE), state,
                      metadata={"format": "tinyclip", "tinyclip_format": FORMAT_VERSION})


def write_json(path, document):
    """``document`` as indented JSON at ``path``, atomically (``staged_file``): complete or not there at all."""
    with staged_file(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=2)
            file.write("\n")


@contextlib.contextmanager
def staged_folder(path):
    """``with staged_folder(path) as staging:`` fill ``staging``; when the block ends without an error it
    takes ``path``'s place whole, and on an error it is deleted and ``path`` is left as it was.

    Only an empty folder or one written before (it holds a config.json) is replaced: any other ``path`` (a
    file, a folder of images) raises ValueError before anything is written, since replacing it would delete it.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not (os.path.isdir(path) and (
            not os.listdir(path) or os.path.isfile(os.path.join(path, CONFIG_FILE)))):
        raise ValueError(f"{path} exists and is not a model folder (no {CONFIG_FILE} in it), so it is not replaced: "
                         f"write to a new folder, or remove it first")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = files.hidden_name(path, "partial")
    os.mkdir(staging)
    try:
        files.reached("staged_folder:created", path)
        yield staging
        files.reached("staged_folder:filled", path)
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging, path):
    """Move the finished folder ``staging`` to ``path``; the old ``path`` is restored if the move fails.

    A new ``path`` takes one atomic rename. Replacing a folder takes two (a folder cannot be renamed over a
    non-empty one): a process killed between them leaves no ``path`` but the complete old one in
    ``.NAME.old-*``, which ``recover_folder`` puts back. Training checkpoints never replace a folder
    (``save_training_checkpoint`` writes a new step folder each time), so they have no such window.
    """
    if not os.path.exists(path):
        os.replace(staging, path)
        files.reached("swap_in:renamed", path)
        files.sync_folder(os.path.dirname(path))
        return
    retired = files.hidden_name(path, "old")
    os.replace(path, retired)
    files.reached("swap_in:moved_aside", path)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(retired, path)
        raise
    files.reached("swap_in:moved_in", path)
    files.sync_folder(os.path.dirname(path))
    shutil.rmtree(retired, ignore_errors=True)


def recover_folder(path):
    """Undo what interrupted ``staged_folder`` writes of ``path`` left: a missing ``path`` whose old copy was
    moved aside is put back, and every other leftover (``.NAME.partial-*``, ``.NAME.old-*``) is deleted.
    Call it only while no other process writes ``path`` (the trainer holds its run folder's lock)."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return
    leftovers = sorted(entry for entry in os.listdir(parent)
                       if entry.startswith((f".{name}.partial-", f".{name}.old-")))
    for entry in leftovers:
        full = os.path.join(parent, entry)
        if entry.startswith(f".{name}.old-") and not os.path.exists(path) and os.path.isdir(full):
            os.replace(full, path)
        elif os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(full)


def load(path, dtype=None, backend=None):
    """The CLIP saved at ``path`` by ``save``, weights bit for bit (in ``dtype`` if given, else as stored).

    The config is validated and the header's shapes checked against the model
    it describes before any weight is read; the model is built without values
    and each weight read straight into it. Raises FileNotFoundError for a
    missing folder or file, ValueError naming the file and the fault for
    anything malformed (see the module docstring).
    """
    path = _checkpoint_folder(path)
    config_path = os.path.join(path, CONFIG_FILE)
    document = _read_json(config_path)
    version = document.get("tinyclip_format")
    if version is None:
        raise ValueError(f"{config_path} is not a tinyclip checkpoint config (no 'tinyclip_format'); "
                         f"use from_pretrained for Hugging Face folders")
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_path}: checkpoint format {version!r}, this tinyclip reads format {FORMAT_VERSION}")
    if "config" not in document:
        raise ValueError(f"{config_path}: no 'config' field")
    try:
        config = CLIPConfig.from_dict(document["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: {error}") from None
    with _open_weights(path) as tensors:
        if dtype is None:
            float_dtypes = {_FLOAT_DTYPES[entry.dtype] for entry in tensors.values() if entry.dtype in _FLOAT_DTYPES}
            dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None
        model = CLIP(config, dtype=dtype, backend=backend, values=False)
        own = _model_state(model)
        missing = [name for name in own if name not in tensors]
        unexpected = [name for name in tensors if name not in own]
        mismatched = [f"{name}: checkpoint {tensors[name].shape} vs model {tuple(own[name].shape)}"
                      for name in own if name in tensors and tensors[name].shape != tuple(own[name].shape)]
        mismatched += _not_float(tensors, own)
        problems = _key_problems(missing, unexpected, mismatched)
        if problems:
            raise ValueError(f"checkpoint {path}: the weights in {_files_of(tensors)} do not fit the model of "
                             f"{config_path}; nothing was loaded\n  " + "\n  ".join(problems))
        _fill(model, {name: (name, "copy") for name in own}, tensors)
    return model


def _key_problems(missing=(), unexpected=(), mismatched=(), shown=20):
    """``nn.key_problems``'s lines, each naming at most ``shown`` keys: an untrusted file may hold millions."""
    lines = []
    for label, keys, separator in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
                                   ("shape mismatches", mismatched, "; ")):
        if keys:
            named = separator.join(key if len(key) <= 200 else key[:200] + "..." for key in keys[:shown])
            more = f"{separator}and {len(keys) - shown} more" if len(keys) > shown else ""
            lines.append(f"{label} ({len(keys)}): {named}{more}")
    return lines


def _files_of(tensors):
    return ", ".join(sorted({entry.path for entry in tensors.values()})) or "its weights file"


def _model_state(model):
    """Every parameter and buffer of ``model`` by its dotted name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _not_float(tensors, plan):
    """A line for each tensor that ``plan``'s keys name and that is not stored as floating point."""
    return [f"{key}: stored as {tensors[key].dtype}, a parameter needs a floating-point dtype"
            for key in sorted(set(plan)) if key in tensors and tensors[key].dtype not in _FLOAT_DTYPES]


def _fill(model, plan, tensors):
    """Read each tensor ``plan`` names ({name: (key, kind)}) from ``tensors`` into the parameter, in its dtype.

    The parameters are placeholders without values (``CLIP(..., values=False)``):
    each gets the array read for it, so the weights are held once.
    """
    own = _model_state(model)
    for name, (key, kind) in plan.items():
        target = own[name]
        entry = tensors[key]
        array = from_hf_array(_tensor(entry.handle, key, entry.path, target.dtype), kind, target.shape)
        array = _backend.asarray(array, _backend.backend_of(target.data), target.dtype)   # CuPy: a device copy
        if isinstance(array, numpy.ndarray) and not (array.flags.c_contiguous and array.flags.writeable):
            array = array.copy()
        target.data = array


# ---------------------------------------------------------------------------------
# Hugging Face CLIP / SigLIP
# ---------------------------------------------------------------------------------

# Hugging Face writes only the fields that differ from its config classes' defaults, so those defaults are
# part of the format (transformers configuration_clip.py / configuration_siglip.py).
_HF_DEFAULTS = {
    "clip": {
        "top": {"projection_dim": 512, "logit_scale_init_value": 2.6592},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                        "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407},
    },
    "siglip": {
        "top": {},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
                          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True},
        "text_config": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
                        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 64,
                        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "eos_token_id": 49407,
                        "projection_size": None},
    },
}

_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "relu": "relu"}


# the tinyclip preset whose switches (class token, pooling, projections, initial scale and bias, ...) each
# Hugging Face family shares; the shapes come from the config being translated
_HF_PRESETS = {"clip": "ViT-B-32", "siglip": "siglip-base-patch16-224"}
_HF_INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size", "vocab_size", "max_position_embeddings")


def config_from_hf(hf_config):
    """The CLIPConfig of a Hugging Face ``CLIPModel`` / ``SiglipModel`` config.json (a dict).

    Fields absent from the file take transformers' defaults; every field used
    is checked for its type and range, and the result is a validated
    CLIPConfig. The family's fixed switches come from tinyclip's preset of it
    (``ViT-B-32`` for CLIP, ``siglip-base-patch16-224`` for SigLIP). Raises
    ValueError naming every field that is wrong.
    """
    if not isinstance(hf_config, dict):
        raise ValueError(f"a Hugging Face config is a JSON object, got {type(hf_config).__name__}")
    family = hf_config.get("model_type")
    if not isinstance(family, str) or family not in _HF_DEFAULTS:
        raise ValueError(f"model_type {family!r} is not supported; tinyclip imports 'clip' and 'siglip' "
                         f"(the two-tower CLIPModel / SiglipModel)")
    defaults = _HF_DEFAULTS[family]
    problems = []
    sections = {}
    for section in ("vision_config", "text_config"):
        given = hf_config.get(section)
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"{section} must be a JSON object, got {type(given).__name__} {given!r:.60}")
        sections[section] = {**defaults[section], **(given or {})}
        for field in _HF_INT_FIELDS:
            value = sections[section].get(field, 1)
            if not _positive_int(value):
                problems.append(f"{section}.{field} {value!r:.60} must be a positive integer")
        eps = sections[section]["layer_norm_eps"]
        if not _real(eps) or not eps > 0:
            problems.append(f"{section}.layer_norm_eps {eps!r:.60} must be a positive number")
        if not isinstance(sections[section]["hidden_act"], str):
            problems.append(f"{section}.hidden_act {sections[section]['hidden_act']!r:.60} must be a string")
    top = {**defaults["top"], **hf_config}
    vision, text = sections["vision_config"], sections["text_config"]
    eos_id = text["eos_token_id"]
    if not _is_int(eos_id) and not (family == "siglip" and eos_id is None):
        problems.append(f"text_config.eos_token_id {eos_id!r:.60} must be an integer")
    if family == "clip":
        if not _positive_int(top["projection_dim"]):
            problems.append(f"projection_dim {top['projection_dim']!r:.60} must be a positive integer")
        if not _real(top["logit_scale_init_value"]) or not math.isfinite(top["logit_scale_init_value"]):
            problems.append(f"logit_scale_init_value {top['logit_scale_init_value']!r:.60} must be a finite number")
        bias = hf_config.get("tinyclip_logit_bias", 0.0)      # written by tinyclip's export (hub.export_hf)
        if not _real(bias) or not math.isfinite(bias):
            problems.append(f"tinyclip_logit_bias {bias!r:.60} must be a finite number")
    else:
        if text["projection_size"] is not None and not _positive_int(text["projection_size"]):
            problems.append(f"text_config.projection_size {text['projection_size']!r:.60} must be a positive "
                            f"integer or null")
        if not isinstance(vision["vision_use_head"], bool):
            problems.append(f"vision_config.vision_use_head {vision['vision_use_head']!r:.60} must be true or false")
    if problems:
        raise ValueError("Hugging Face config: " + "; ".join(problems))
    activations = {_HF_ACTIVATIONS.get(vision["hidden_act"]), _HF_ACTIVATIONS.get(text["hidden_act"])}
    if None in activations or len(activations) != 1:
        problems.append(f"hidden_act vision {vision['hidden_act']!r} / text {text['hidden_act']!r}: tinyclip "
                        f"needs one activation for both towers, one of {sorted(_HF_ACTIVATIONS)}")
    if vision["layer_norm_eps"] != text["layer_norm_eps"]:
        problems.append(f"layer_norm_eps differs between towers ({vision['layer_norm_eps']} vs "
                        f"{text['layer_norm_eps']}); tinyclip has one")
    if vision["num_channels"] != 3:
        problems.append(f"vision num_channels is {vision['num_channels']}; tinyclip takes RGB images")
    if family == "siglip" and not vision["vision_use_head"]:
        problems.append("vision_use_head is false: the image embedding of SiglipModel needs the pooling head")
    vision_ratio = vision["intermediate_size"] / vision["hidden_size"]
    text_ratio = text["intermediate_size"] / text["hidden_size"]
    for tower, settings, ratio in (("vision", vision, vision_ratio), ("text", text, text_ratio)):
        if int(settings["hidden_size"] * ratio) != settings["intermediate_size"]:
            problems.append(f"{tower} intermediate_size {settings['intermediate_size']} is not reproduced by "
                            f"the MLP ratio {ratio} of width {settings['hidden_size']}")
    if problems:
        raise ValueError("Hugging Face config: " + "; ".join(problems))
    vocab_size = text["vocab_size"]
    shapes = {"image_size": vision["image_size"], "patch_size": vision["patch_size"],
              "vision_width": vision["hidden_size"], "vision_layers": vision["num_hidden_layers"],
              "vision_heads": vision["num_attention_heads"], "vision_mlp_ratio": vision_ratio,
              "context_length": text["max_position_embeddings"], "vocab_size": vocab_size,
              "text_width": text["hidden_size"], "text_layers": text["num_hidden_layers"],
              "text_heads": text["num_attention_heads"], "text_mlp_ratio": text_ratio,
              "activation": activations.pop(), "ln_eps": vision["layer_norm_eps"]}
    in_vocabulary = eos_id is not None and 0 <= eos_id < vocab_size
    if family == "clip":
        # transformers keeps OpenAI's argmax pooling for configs with the legacy eos_token_id 2
        pooling = "argmax" if eos_id == 2 else "eos"
        shapes.update(text_pooling=pooling, eos_id=eos_id if pooling == "eos" else vocab_size - 1,
                      embed_dim=top["projection_dim"], init_log_scale=float(top["logit_scale_init_value"]))
        if "tinyclip_logit_bias" in hf_config:    # a CLIPModel trained with the SigLIP loss: its bias comes back
            shapes.update(init_bias=float(hf_config["tinyclip_logit_bias"]))
    else:
        shapes.update(embed_dim=text["projection_size"] or text["hidden_size"],
                      eos_id=eos_id if in_vocabulary else vocab_size - 1)     # unused by SigLIP's "last" pooling
    try:
        return dataclasses.replace(PRESETS[_HF_PRESETS[family]], **shapes)
    except ValueError as error:
        raise ValueError(f"Hugging Face config translated to tinyclip's: {error}") from None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value):
    return _is_int(value) and value > 0


def _real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TOWERS = {"visual": "vision_model", "text": "text_model"}
_BLOCK_PARTS = {"attn": "self_attn", "ln1": "layer_norm1", "ln2": "layer_norm2", "mlp": "mlp"}
_HEAD_PARTS = {"attn.out_proj": "attention.out_proj", "ln": "layernorm", "mlp.fc1": "mlp.fc1",
               "mlp.fc2": "mlp.fc2"}

# tinyclip name (a regular expression) -> Hugging Face name, per family ("*" for both); groups fill the template
_HF_NAMES = [
    (r"(?P<tower>visual|text)\.transformer\.blocks\.(?P<n>\d+)\.(?P<part>attn|ln1|ln2|mlp)\.(?P<rest>.+)",
     {"*": "{tower}.encoder.layers.{n}.{part}.{rest}"}),
    (r"visual\.patch_embed\.(?P<rest>weight|bias)", {"*": "vision_model.embeddings.patch_embedding.{rest}"}),
    (r"visual\.class_embedding", {"clip": "vision_model.embeddings.class_embedding"}),
    (r"(?P<tower>visual|text)\.position_embedding", {"*": "{tower}.embeddings.position_embedding.weight"}),
    (r"visual\.ln_pre\.(?P<rest>weight|bias)", {"clip": "vision_model.pre_layrnorm.{rest}"}),   # sic
    (r"visual\.ln_post\.(?P<rest>weight|bias)", {"*": "vision_model.post_layernorm.{rest}"}),
    (r"visual\.proj\.weight", {"clip": "visual_projection.weight"}),
    (r"visual\.head\.probe", {"siglip": "vision_model.head.probe"}),
    (r"visual\.head\.attn\.[qkv]_proj\.(?P<rest>weight|bias)", {"siglip": "vision_model.head.attention.in_proj_{rest}"}),
    (r"visual\.head\.(?P<part>attn\.out_proj|ln|mlp\.fc1|mlp\.fc2)\.(?P<rest>weight|bias)",
     {"siglip": "vision_model.head.{part}.{rest}"}),
    (r"text\.token_embedding\.weight", {"*": "text_model.embeddings.token_embedding.weight"}),
    (r"text\.ln_final\.(?P<rest>weight|bias)", {"*": "text_model.final_layer_norm.{rest}"}),
    (r"text\.proj\.(?P<rest>weight|bias)", {"clip": "text_projection.{rest}", "siglip": "text_model.head.{rest}"}),
    (r"log_scale", {"*": "logit_scale"}),
    (r"bias", {"siglip": "logit_bias"}),
]
_HF_IGNORED = re.compile(r".*\.position_ids")     # index buffers some transformers versions save


def hf_name(name, family):
    """The Hugging Face key that holds tinyclip's parameter ``name`` (``family`` 'clip' or 'siglip')."""
    for pattern, templates in _HF_NAMES:
        match = re.fullmatch(pattern, name)
        if match and (family in templates or "*" in templates):
            groups = dict(match.groupdict())
            if "tower" in groups:
                groups["tower"] = _TOWERS[groups["tower"]]
            if "part" in groups:
                groups["part"] = _BLOCK_PARTS.get(groups["part"]) or _HEAD_PARTS[groups["part"]]
            return templates.get(family, templates.get("*")).format(**groups)
    raise KeyError(f"tinyclip parameter {name!r} has no Hugging Face {family} counterpart")


def hf_layout(name, shape, config):
    """How parameter ``name`` of ``shape`` is stored by Hugging Face: (kind, Hugging Face shape).

    kind is 'copy'; 'patch' (a convolution kernel (W, 3, P, P) for our (W, P·P·3)
    linear weight); 'scalar' (SigLIP stores the scale and bias as shape (1,));
    or 'q', 'k', 'v' (a third of PyTorch MultiheadAttention's packed in_proj).
    """
    if name == "visual.patch_embed.weight":
        return "patch", (shape[0], 3, config.patch_size, config.patch_size)
    if name in ("log_scale", "bias"):
        return "scalar", (1,) if config.family == "siglip" else ()
    match = re.fullmatch(r"visual\.head\.attn\.([qkv])_proj\.(weight|bias)", name)
    if match:
        return match.group(1), (3 * shape[0],) + tuple(shape[1:])
    return "copy", tuple(shape)


def from_hf_array(array, kind, shape):
    """A Hugging Face array in tinyclip's layout (``shape``)."""
    if kind == "patch":                       # (W, 3, P, P) -> (W, P, P, 3) -> (W, P·P·3), our patch order
        return array.transpose(0, 2, 3, 1).reshape(shape)
    if kind in ("q", "k", "v"):               # rows [0, W) are q, [W, 2W) k, [2W, 3W) v
        third = array.shape[0] // 3
        start = "qkv".index(kind) * third
        return array[start:start + third].copy()       # a copy: a view would keep all three alive
    return array.reshape(shape)


def hf_plan(hf_shapes, model, architecture=None):
    """Where each of ``model``'s parameters comes from: ``{name: (Hugging Face key, kind)}`` (kinds of ``hf_layout``).

    ``hf_shapes`` maps each Hugging Face key to its shape (a tuple); ``architecture`` is the file's
    ``model_type`` (default: the model's family). Raises one ValueError that names every missing, unexpected
    and mis-shaped key. A CLIPModel has no logit bias: a model with one (``tinyclip_logit_bias``) is not
    planned a key for it.
    """
    config = model.config
    architecture = architecture or config.family
    plan, used, missing, mismatched = {}, set(), [], []
    for name, parameter in model.named_parameters():
        if name == "bias" and architecture == "clip":
            continue
        key = hf_name(name, architecture)
        kind, expected = hf_layout(name, parameter.shape, config)
        if key not in hf_shapes:
            missing.append(key)
            continue
        used.add(key)
        shape = tuple(hf_shapes[key])
        fits = shape == expected or (kind == "scalar" and math.prod(shape) == 1 and len(shape) <= 1)
        if not fits:
            mismatched.append(f"{key}: checkpoint {shape} vs model {expected}")
            continue
        plan[name] = (key, kind)
    unexpected = [key for key in hf_shapes if key not in used and not _HF_IGNORED.fullmatch(key)]
    problems = _key_problems(sorted(set(missing)), sorted(unexpected), sorted(set(mismatched)))
    if problems:
        raise ValueError("the Hugging Face weights do not fit the model built from their config\n  "
                         + "\n  ".join(problems))
    return plan


def state_from_hf(hf_state, model):
    """tinyclip's state dict for ``model`` from a Hugging Face state dict; one error names every misfit."""
    plan = hf_plan({key: tuple(array.shape) for key, array in hf_state.items()}, model)
    own = dict(model.named_parameters())
    return {name: from_hf_array(hf_state[key], kind, own[name].shape) for name, (key, kind) in plan.items()}


def from_pretrained(path, dtype=None, backend=None, image_size=None):
    """A CLIP from a folder: a Hugging Face CLIP / SigLIP checkpoint, or one written by ``save``.

    Hugging Face weights are converted to ``dtype`` (default: the backend's
    default float type, float32) whatever they were stored in. The config is
    translated and validated and every shape checked before any weight is
    read (see ``load``). With ``image_size`` a ViT is rebuilt for that input
    side (``at_image_size``). Raises FileNotFoundError for a missing folder
    or file, ValueError naming the file and the fault for anything malformed.
    """
    return at_image_size(_from_folder(path, dtype, backend), image_size, where=path)


def resized_config(config, image_size):
    """``config`` for images of side ``image_size`` (``at_image_size``'s checks, no weights needed)."""
    if config.vision_type != "vit":
        raise ValueError(f"image_size {image_size}: only a ViT image tower has position embeddings to resize; "
                         f"this model's tower is {config.vision_type!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < config.patch_size:
        raise ValueError(f"image_size must be a positive multiple of the patch size {config.patch_size}, "
                         f"got {image_size!r}")
    return dataclasses.replace(config, image_size=image_size)


def at_image_size(model, image_size, where=None):
    """The same CLIP for images of side ``image_size``: its position embeddings resized to the new patch grid.

    ``model`` itself when ``image_size`` is None or already its size. The
    class token's embedding is kept and the patch grid's is resized
    bicubically (``models.vision.resize_position_embedding``, transformers'
    ``interpolate_pos_encoding``); every other weight is copied. Raises
    ValueError for a CNN tower (it has no position embeddings and takes any
    size already) or a side that is not a positive multiple of the patch size,
    naming the checkpoint ``where`` the model came from when given.
    """
    config = model.config
    if image_size is None or image_size == config.image_size:
        return model
    try:
        new_config = resized_config(config, image_size)
    except ValueError as error:
        raise ValueError(f"checkpoint {os.fspath(where)}: {error}" if where is not None else str(error)) from None
    resized = CLIP(new_config, dtype=model.log_scale.data.dtype, backend=_backend.backend_of(model.log_scale.data))
    state = dict(model.state_dict())
    state["visual.position_embedding"] = resize_position_embedding(
        state["visual.position_embedding"], config.image_size // config.patch_size,
        image_size // config.patch_size, config.class_token)
    resized.load_state_dict(state)
    return resized


def _from_folder(path, dtype, backend):
    path = _checkpoint_folder(path)
    config_path = os.path.join(path, CONFIG_FILE)
    hf_config = _read_json(config_path)
    if "tinyclip_format" in hf_config:
        return load(path, dtype=dtype, backend=backend)
    try:
        config = config_from_hf(hf_config)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    with _open_weights(path) as tensors:
        model = CLIP(config, dtype=dtype, backend=backend, values=False)
        try:
            plan = hf_plan({key: entry.shape for key, entry in tensors.items()}, model, hf_config["model_type"])
            problems = _not_float(tensors, [key for key, _ in plan.values()])
            if problems:
                raise ValueError("\n  ".join(["the Hugging Face weights do not fit the model"] + problems))
        except ValueError as error:
            raise ValueError(f"checkpoint {path} ({_files_of(tensors)}): {error}") from None
        _fill(model, plan, tensors)
        if model.bias is not None and "bias" not in plan:          # config.json's tinyclip_logit_bias
            model.bias.data = _backend.asarray(numpy.full((), config.init_bias), _backend.backend_of(
                model.log_scale.data), model.log_scale.data.dtype)
    return model


# ---------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------

def _refuse_pickle(path):
    raise ValueError(f"{path} is a pickle checkpoint (PyTorch .bin/.pt format). Reading it could run arbitrary "
                     f"code, so tinyclip never unpickles files. Convert it to safetensors first, e.g. with "
                     f"transformers (load the model, then model.save_pretrained(folder, safe_serialization=True)), "
                     f"or with PyTorch (read the state dict with weights_only=True, then write it with "
                     f"safetensors.torch.save_file)")


def _checkpoint_folder(path):
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.lower().endswith(PICKLE_SUFFIXES):
            _refuse_pickle(path)
        raise ValueError(f"{path} is a file; a checkpoint is a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder at {path!r}")
    return path


def _read_json(path):
    """The JSON object in ``path`` (a config or an index), read as an untrusted file (``tinyclip.files``)."""
    document = files.read_json(path, what="checkpoint config", max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(document).__name__}")
    return document


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor of an open weights file: where it is, its safetensors dtype and its shape; nothing read yet."""
    handle: object
    path: str
    dtype: str
    shape: tuple


@contextlib.contextmanager
def _open_weights(folder):
    """``{name: _Entry}`` for every tensor of the folder's model.safetensors (or of the shards its index names).

    Only the headers are read (the files stay memory-mapped and open while the
    block runs). Raises FileNotFoundError when there are no weights, ValueError
    naming the file for a malformed one, an index that is not one, a tensor in
    two shards, or pickles only.
    """
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX_FILE)
    if os.path.lexists(single):
        shards = [single]
    elif os.path.lexists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must be a JSON object of tensor name -> shard file name")
        shards = [os.path.join(folder, os.path.basename(shard)) for shard in sorted(set(weight_map.values()))]
        absent = [shard for shard in shards if not os.path.lexists(shard)]
        if absent:
            raise ValueError(f"{index} names shards that are not in {folder}: {', '.join(absent)}")
    else:
        pickles = sorted(name for name in os.listdir(folder) if name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            _refuse_pickle(os.path.join(folder, pickles[0]))
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}")
    with contextlib.ExitStack() as stack:
        tensors = {}
        for shard in shards:
            handle = stack.enter_context(_open_safetensors(shard))
            for name in handle.keys():
                if name in tensors:
                    raise ValueError(f"{shard}: tensor {name!r} is also in {tensors[name].path}")
                part = handle.get_slice(name)
                tensors[name] = _Entry(handle, shard, part.get_dtype(), tuple(part.get_shape()))
        yield tensors


# ---------------------------------------------------------------------------------
# Training checkpoints (tinyclip.train): everything a step depends on, one folder per saved step
# ---------------------------------------------------------------------------------
#
# RUN/checkpoint/
#     step-00000400/      model/ (save's format + the tokenizer), optimizer.safetensors, state.json
#     step-00000500/
#     latest              "step-00000500": the newest step folder, for people and scripts
#
# A step folder is filled under a hidden name and renamed into place once complete: that one rename is the
# commit, and no folder is ever replaced, so at every instant the newest step folder is a complete checkpoint.
# Then ``latest`` is replaced (atomically) and all but the newest ``keep`` step folders are deleted, oldest
# first. Leftovers of a writer killed half-way (hidden ``.step-*.partial-*`` folders) are deleted by
# ``clean_training_checkpoints`` when the run starts again.

TRAINING_CHECKPOINT_DIR = "checkpoint"
TRAINING_STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LATEST_FILE = "latest"
_STEP_FOLDER = re.compile(r"step-(\d{8,})")


def save_model_with_tokenizer(model, tokenizer, path):
    """``model`` in tinyclip's format with its tokenizer beside the weights, complete or absent (one swap)."""
    with staged_folder(path) as staging:
        _write_model(model, staging)
        tokenizer.save(os.path.join(staging, SPIECE_FILE if isinstance(tokenizer, SiglipTokenizer) else TOKENIZER_FILE))


def step_folder_name(step):
    return f"step-{step:08d}"


def _step_folders(root):
    """{step: folder name} of the complete step folders in ``root``."""
    if not os.path.isdir(root):
        return {}
    found = {}
    for name in os.listdir(root):
        match = _STEP_FOLDER.fullmatch(name)
        if match and os.path.isfile(os.path.join(root, name, TRAINING_STATE_FILE)):
            found[int(match.group(1))] = name
    return found


def save_training_checkpoint(root, step, model, tokenizer, optimizer, schedule, state, keep=2):
    """Write the checkpoint of ``step`` into ``root`` (RUN/checkpoint) and keep the newest ``keep`` ones.

    ``state`` is what state.json holds besides the step and the optimiser's
    numbers and groups (the train config, loader position, seconds, ...).
    Returns the step folder's path.
    """
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f"save_training_checkpoint: keep must be an int >= 1, got {keep!r}")
    target = os.path.join(root, step_folder_name(step))
    if os.path.exists(target):          # a step folder past the newest a resumed run went back to: redone now
        shutil.rmtree(target)
    with staged_folder(target) as staging:
        save_model_with_tokenizer(model, tokenizer, os.path.join(staging, "model"))
        optimizer_state = optimizer.state_dict()
        arrays, numbers = {}, {}
        for index, entry in optimizer_state["state"].items():
            for key, value in entry.items():
                (arrays if hasattr(value, "shape") else numbers)[f"{index}.{key}"] = value
        write_safetensors(os.path.join(staging, OPTIMIZER_FILE), arrays)
        write_json(os.path.join(staging, TRAINING_STATE_FILE), {
            **state, "step": step, "schedule": schedule.state_dict(),
            "optimizer_groups": optimizer_state["param_groups"], "optimizer_numbers": numbers})
    _write_latest(root)
    for old in sorted(_step_folders(root))[:-keep]:
        # renamed out of sight first, so that a kill while deleting leaves a leftover, not a broken step folder
        doomed = files.hidden_name(os.path.join(root, step_folder_name(old)), "old")
        os.replace(os.path.join(root, step_folder_name(old)), doomed)
        files.reached("save_training_checkpoint:pruning", doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return target


def _write_latest(root):
    steps = _step_folders(root)
    if steps:
        with staged_file(os.path.join(root, LATEST_FILE)) as temporary:
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(steps[max(steps)] + "\n")


def clean_training_checkpoints(root):
    """Delete what interrupted checkpoint writes left in ``root`` and point ``latest`` at the newest step folder.

    Call it only while holding the run folder's lock (no writer is alive).
    """
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        full = os.path.join(root, name)
        if is_leftover(name):
            if os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(full)
    _write_latest(root)


def latest_training_checkpoint(path):
    """The newest complete training checkpoint in ``path``: a run folder, its checkpoint/, or a step folder.

    Raises ValueError naming ``path`` when there is none.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, TRAINING_STATE_FILE)):
        return path
    for root in (os.path.join(path, TRAINING_CHECKPOINT_DIR), path):
        steps = _step_folders(root)
        if steps:
            return os.path.join(root, steps[max(steps)])
    raise ValueError(f"{path}: no training checkpoint there (looked for {TRAINING_CHECKPOINT_DIR}/step-*/"
                     f"{TRAINING_STATE_FILE})")


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# the fields of state.json and what each must be
_STATE_FIELDS = {
    "step": (_is_count, "a non-negative int"),
    "seconds": (lambda value: _is_number(value) and value >= 0, "a non-negative number"),
    "train_config": (lambda value: isinstance(value, dict), "an object (the TrainConfig)"),
    "loader": (lambda value: isinstance(value, dict) and all(_is_count(value.get(key)) for key in ("epoch", "step")),
               "an object with non-negative ints epoch and step (Loader.state())"),
    "schedule": (lambda value: isinstance(value, dict) and _is_count(value.get("step_count"))
                 and isinstance(value.get("base_lrs"), list) and all(map(_is_number, value["base_lrs"]))
                 and _is_count(value.get("warmup_steps")) and _is_count(value.get("total_steps"))
                 and _is_number(value.get("min_lr")), "an object as WarmupCosine.state_dict() writes it"),
    "optimizer_groups": (lambda value: isinstance(value, list) and all(isinstance(group, dict) for group in value),
                         "a list of objects (the optimiser's parameter groups)"),
    "optimizer_numbers": (lambda value: isinstance(value, dict) and all(
        _STATE_KEY.fullmatch(key) and _is_number(number) for key, number in value.items()),
                          "an object of 'INDEX.NAME': number"),
}
_STATE_KEY = re.compile(r"\d+\.\w+")


def read_training_state(folder):
    """state.json of the step folder ``folder``, every field checked; errors name the file and the field."""
    path = os.path.join(folder, TRAINING_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            state = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(state).__name__}")
    for field, (valid, what) in _STATE_FIELDS.items():
        if field not in state:
            raise ValueError(f"{path}: field {field!r} is missing")
        if not valid(state[field]):
            raise ValueError(f"{path}: field {field!r} must be {what}, got {state[field]!r}")
    match = _STEP_FOLDER.fullmatch(os.path.basename(os.path.normpath(folder)))
    if match and int(match.group(1)) != state["step"]:
        raise ValueError(f"{path}: field 'step' is {state['step']} in the folder of step {int(match.group(1))}")
    if state["schedule"]["step_count"] != state["step"]:
        raise ValueError(f"{path}: field 'schedule' has step_count {state['schedule']['step_count']}, "
                         f"field 'step' is {state['step']}")
    for name in ("model/" + CONFIG_FILE, "model/" + WEIGHTS_FILE, OPTIMIZER_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{folder}: the checkpoint has no {name}")
    if not any(os.path.isfile(os.path.join(folder, "model", name)) for name in TOKENIZER_FILES):
        raise ValueError(f"{folder}: the checkpoint's model/ has no tokenizer (looked for {', '.join(TOKENIZER_FILES)})")
    return state


def restore_training(folder, state, model, optimizer, schedule):
    """Load the weights, optimiser moments and schedule of the checkpoint ``folder`` into the live objects."""
    weights = os.path.join(folder, "model", WEIGHTS_FILE)
    try:
        model.load_state_dict(read_safetensors(weights))
    except ValueError as error:
        raise ValueError(f"{weights}: {error}") from None
    entries = {}
    moments = os.path.join(folder, OPTIMIZER_FILE)
    for key, value in read_safetensors(moments).items():
        if not _STATE_KEY.fullmatch(key):
            raise ValueError(f"{moments}: tensor {key!r} is not named 'INDEX.NAME'")
        index, name = key.split(".", 1)
        entries.setdefault(index, {})[name] = value
    for key, value in state["optimizer_numbers"].items():
        index, name = key.split(".", 1)
        entries.setdefault(index, {})[name] = value
    where = os.path.join(folder, TRAINING_STATE_FILE)
    try:
        optimizer.load_state_dict({"state": entries, "param_groups": state["optimizer_groups"]})
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{moments} and {where}: the optimiser state does not fit this model: {error}") from None
    try:
        schedule.load_state_dict(state["schedule"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: field 'schedule': {error}") from None
