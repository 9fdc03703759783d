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

Safetensors (https://github.com/huggingface/safetensors) is read and written
here directly: an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes.
That keeps the format free of dependencies and lets bfloat16 weights load on
NumPy (as float32). Pickle formats (``pytorch_model.bin``, ``.pt``, ...)
can run code when read, so they are refused, never unpickled.
"""

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import struct

import numpy

from . import backend as _backend
from . import nn
from .models import CLIP, CLIPConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"   # sharded Hugging Face checkpoints
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


# ---------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}
_NUMPY_TO_SAFETENSORS = {numpy.dtype(code).newbyteorder("<").str: name for name, code in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path, arrays, metadata=None):
    """Write ``{name: array}`` (NumPy or CuPy; CuPy is copied to the host) as a safetensors file."""
    header, blobs, offset = {}, [], 0
    for name in sorted(arrays):
        array = numpy.asarray(_to_host(arrays[name]), order="C")   # (ascontiguousarray would make 0-d 1-d)
        code = _NUMPY_TO_SAFETENSORS.get(array.dtype.newbyteorder("<").str)
        if code is None:
            raise ValueError(f"write_safetensors: {name} has dtype {array.dtype}, which safetensors cannot store")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)           # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for blob in blobs:
            file.write(blob)
        file.flush()
        os.fsync(file.fileno())


def read_safetensors(path):
    """``{name: NumPy array}`` from a safetensors file; bfloat16 becomes float32 (exactly)."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        data = file.read()
    try:
        (header_length,) = struct.unpack("<Q", data[:8])
        if header_length > len(data) - 8:
            raise ValueError(f"the header claims {header_length} bytes but the file has {len(data)}")
        header = json.loads(data[8:8 + header_length])
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a safetensors file: {error}") from None
    body = memoryview(data)[8 + header_length:]
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(offset) for offset in entry["data_offsets"])
            shape = tuple(int(side) for side in entry["shape"])
            dtype = entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed safetensors header entry for {name!r}: {entry!r}") from None
        if dtype == "BF16":        # the top half of a float32: shift the bits back into place
            raw = numpy.frombuffer(body[start:end], dtype="<u2").astype(numpy.uint32) << 16
            array = raw.view(numpy.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            array = numpy.frombuffer(body[start:end], dtype=_SAFETENSORS_DTYPES[dtype])
        else:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}, which tinyclip cannot read")
        if array.size != int(numpy.prod(shape, dtype=numpy.int64)):
            raise ValueError(f"{path}: tensor {name} holds {array.size} values, its shape {shape} needs "
                             f"{int(numpy.prod(shape))}")
        arrays[name] = array.reshape(shape).astype(array.dtype.newbyteorder("="), copy=True)
    return arrays


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


# Atomic writes. A file or folder is written under a hidden name beside its target (``.NAME.partial-PID-XXXX``)
# and renamed into place only when complete and flushed: a rename within one folder is atomic, so a reader
# (or a run resumed after a kill) sees the old target or the new one, never half of one. Hidden names are
# created with os.mkdir / open, never mkdtemp / mkstemp, so what is written gets the user's umask like any
# other file (mkdtemp's 0700 would hide a model from the other users of a shared machine).

fault_hook = None     # tests only: a callable(point, path) run at every step of every atomic write


def _reached(point, path):
    """A named step of an atomic write of ``path``: where tests stop the writer, deterministically
    (tests/mpi/train_with_faults.py kills the process at each of them in turn)."""
    if fault_hook is not None:
        fault_hook(point, path)


def _hidden_name(path, kind):
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _sync_folder(folder):
    """Make a rename inside ``folder`` durable (POSIX: fsync the folder); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def is_leftover(name):
    """Whether ``name`` (a file or folder name) is what an interrupted atomic write leaves behind."""
    return name.startswith(".") and (".partial-" in name or ".old-" in name)


@contextlib.contextmanager
def staged_file(path):
    """``with staged_file(path) as temporary:`` write the file ``temporary``; when the block ends without an
    error it is flushed and renamed over ``path``, on an error deleted (``path`` is left as it was).

    ``temporary`` ends with ``path``'s suffix, so writers that go by the suffix (matplotlib) still work.
    """
    path = os.path.abspath(os.fspath(path))
    temporary = _hidden_name(path, "partial") + os.path.splitext(path)[1]
    try:
        yield temporary
        _reached("staged_file:written", path)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _reached("staged_file:replaced", path)
        _sync_folder(os.path.dirname(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def staged_folder(path):
    """``with staged_folder(path) as staging:`` fill ``staging``; when the block ends without an error it
    takes ``path``'s place whole, and on an error it is deleted and ``path`` is left as it was."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = _hidden_name(path, "partial")
    os.mkdir(staging)
    try:
        _reached("staged_folder:created", path)
        yield staging
        _reached("staged_folder:filled", path)
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
        _reached("swap_in:renamed", path)
        _sync_folder(os.path.dirname(path))
        return
    retired = _hidden_name(path, "old")
    os.replace(path, retired)
    _reached("swap_in:moved_aside", path)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(retired, path)
        raise
    _reached("swap_in:moved_in", path)
    _sync_folder(os.path.dirname(path))
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
    """The CLIP saved at ``path`` by ``save``, weights bit for bit (in ``dtype`` if given, else as stored)."""
    path = _checkpoint_folder(path)
    document = _read_json(os.path.join(path, CONFIG_FILE))
    version = document.get("tinyclip_format")
    if version is None:
        raise ValueError(f"{path}/{CONFIG_FILE} is not a tinyclip checkpoint config (no 'tinyclip_format'); "
                         f"use from_pretrained for Hugging Face folders")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version}, this tinyclip reads format {FORMAT_VERSION}")
    try:
        config = CLIPConfig.from_dict(document["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}/{CONFIG_FILE}: {error}") from None
    state = _read_weights(path)
    if dtype is None:
        float_dtypes = {array.dtype for array in state.values() if array.dtype.kind == "f"}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None
    model = CLIP(config, dtype=dtype, backend=backend)
    _load_into(model, state, path)
    return model


def _load_into(model, state, path):
    try:
        model.load_state_dict(state)
    except ValueError as error:
        raise ValueError(f"checkpoint {path}: {error}") from None


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


def config_from_hf(hf_config):
    """The CLIPConfig of a Hugging Face ``CLIPModel`` / ``SiglipModel`` config.json (a dict)."""
    family = hf_config.get("model_type")
    if family not in _HF_DEFAULTS:
        raise ValueError(f"model_type {family!r} is not supported; tinyclip imports 'clip' and 'siglip' "
                         f"(the two-tower CLIPModel / SiglipModel)")
    defaults = _HF_DEFAULTS[family]
    top = {**defaults["top"], **hf_config}
    vision = {**defaults["vision_config"], **(hf_config.get("vision_config") or {})}
    text = {**defaults["text_config"], **(hf_config.get("text_config") or {})}
    problems = []
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
    vocab_size, eos_id = text["vocab_size"], text["eos_token_id"]
    common = {"image_size": vision["image_size"], "patch_size": vision["patch_size"],
              "vision_width": vision["hidden_size"], "vision_layers": vision["num_hidden_layers"],
              "vision_heads": vision["num_attention_heads"], "vision_mlp_ratio": vision_ratio,
              "context_length": text["max_position_embeddings"], "vocab_size": vocab_size,
              "text_width": text["hidden_size"], "text_layers": text["num_hidden_layers"],
              "text_heads": text["num_attention_heads"], "text_mlp_ratio": text_ratio,
              "activation": activations.pop(), "ln_eps": vision["layer_norm_eps"]}
    if family == "clip":
        # transformers keeps OpenAI's argmax pooling for configs with the legacy eos_token_id 2
        pooling = "argmax" if eos_id == 2 else "eos"
        return CLIPConfig(**common, class_token=True, vision_pre_norm=True, patch_bias=False,
                          vision_pooling="cls", vision_projection=True, causal=True, text_pooling=pooling,
                          eos_id=eos_id if pooling == "eos" else vocab_size - 1, text_projection_bias=False,
                          embed_dim=top["projection_dim"], init_log_scale=float(top["logit_scale_init_value"]),
                          init_bias=None)
    embed_dim = text["projection_size"] or text["hidden_size"]
    return CLIPConfig(**common, class_token=False, vision_pre_norm=False, patch_bias=True, vision_pooling="map",
                      vision_projection=False, causal=False, text_pooling="last",
                      eos_id=eos_id if 0 <= eos_id < vocab_size else vocab_size - 1,   # unused by "last"
                      text_projection_bias=True, embed_dim=embed_dim, init_log_scale=float(numpy.log(10.0)),
                      init_bias=-10.0)


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
        return array[start:start + third]
    return array.reshape(shape)


def state_from_hf(hf_state, model):
    """tinyclip's state dict for ``model`` from a Hugging Face state dict; one error names every misfit."""
    config = model.config
    state, used, missing, mismatched = {}, set(), [], []
    for name, parameter in model.named_parameters():
        key = hf_name(name, config.family)
        kind, expected = hf_layout(name, parameter.shape, config)
        if key not in hf_state:
            missing.append(key)
            continue
        used.add(key)
        array = hf_state[key]
        fits = tuple(array.shape) == expected or (kind == "scalar" and array.size == 1 and array.ndim <= 1)
        if not fits:
            mismatched.append(f"{key}: checkpoint {tuple(array.shape)} vs model {expected}")
            continue
        state[name] = from_hf_array(array, kind, parameter.shape)
    unexpected = [key for key in hf_state if key not in used and not _HF_IGNORED.fullmatch(key)]
    problems = nn.key_problems(sorted(set(missing)), sorted(unexpected), sorted(set(mismatched)))
    if problems:
        raise ValueError("the Hugging Face weights do not fit the model built from their config\n  "
                         + "\n  ".join(problems))
    return state


def from_pretrained(path, dtype=None, backend=None):
    """A CLIP from a folder: a Hugging Face CLIP / SigLIP checkpoint, or one written by ``save``.

    Hugging Face weights are converted to ``dtype`` (default: the backend's
    default float type, float32) whatever they were stored in.
    """
    path = _checkpoint_folder(path)
    hf_config = _read_json(os.path.join(path, CONFIG_FILE))
    if "tinyclip_format" in hf_config:
        return load(path, dtype=dtype, backend=backend)
    try:
        config = config_from_hf(hf_config)
    except ValueError as error:
        raise ValueError(f"{path}/{CONFIG_FILE}: {error}") from None
    hf_state = _read_weights(path)
    model = CLIP(config, dtype=dtype, backend=backend)
    try:
        state = state_from_hf(hf_state, model)
    except ValueError as error:
        raise ValueError(f"checkpoint {path}: {error}") from None
    _load_into(model, state, path)
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
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint config {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(document).__name__}")
    return document


def _read_weights(folder):
    """Every tensor of the folder's model.safetensors (or of the shards its index names)."""
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        state = {}
        for shard in shards:
            state.update(read_safetensors(os.path.join(folder, os.path.basename(shard))))
        return state
    pickles = sorted(name for name in os.listdir(folder) if name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        _refuse_pickle(os.path.join(folder, pickles[0]))
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}")


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
TOKENIZER_FILE = "tokenizer.tinyclip.json"      # a model folder's tokenizer, beside config.json
_STEP_FOLDER = re.compile(r"step-(\d{8,})")


def save_model_with_tokenizer(model, tokenizer, path):
    """``model`` in tinyclip's format with its tokenizer beside the weights, complete or absent (one swap)."""
    with staged_folder(path) as staging:
        _write_model(model, staging)
        tokenizer.save(os.path.join(staging, TOKENIZER_FILE))


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
        doomed = _hidden_name(os.path.join(root, step_folder_name(old)), "old")
        os.replace(os.path.join(root, step_folder_name(old)), doomed)
        _reached("save_training_checkpoint:pruning", doomed)
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
    for name in ("model/" + CONFIG_FILE, "model/" + WEIGHTS_FILE, "model/" + TOKENIZER_FILE, OPTIMIZER_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{folder}: the checkpoint has no {name}")
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
