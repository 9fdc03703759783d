"""A corpus of malformed model folders, weights files and tokenizers, built by hand for the loaders to refuse.

Each case is a small file or folder (a 30 GB file is written sparse: it
takes no disk) with the loader to hand it to and the path of the file at
fault, which the error must name. ``tests/test_untrusted.py`` loads each
and expects a ValueError naming that file, within a bound on allocation and
time; where the file at fault is a safetensors file, it also asks the
``safetensors`` package for its verdict, and tinyclip must refuse whatever
the package refuses. The faults are those of issue 15: offsets out of
place, a file much larger than its weights, sizes that overflow or do not
divide, deep JSON, configs that are huge, zero, of the wrong type, and
files that are not regular files.

    python tests/malformed_files.py OUTDIR     # write the corpus into OUTDIR and list it
"""

import dataclasses
import gzip
import json
import os
import re
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout
from tinyclip import checkpoint  # noqa: E402
from tinyclip.models import CLIP, preset  # noqa: E402
from tinyclip.tokenizer import FORMAT, FORMAT_VERSION, MAX_MERGES_BYTES, SOT, EOT  # noqa: E402

DEEP = 200_000                 # levels of nesting in the deep-JSON cases
SPARSE_BYTES = 30 * 2**30      # the 30 GB file of the issue, written sparse


@dataclasses.dataclass
class Case:
    name: str
    loader: str              # "load", "from_pretrained", "read_safetensors", "tokenizer", "bpe"
    target: str              # what is handed to the loader (a folder or a file)
    at_fault: str            # the file the error must name
    pipe: bool = False       # the file at fault is a FIFO: a hang would block the test until a writer comes


# ---- safetensors written by hand -------------------------------------------------------------------

def raw_safetensors(path, header, data=b"", length=None, size=None):
    """A safetensors file from a header (a dict, or bytes as they are) and data; ``size`` pads it sparse."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as file:
        file.write((len(encoded) if length is None else length).to_bytes(8, "little"))
        file.write(encoded)
        file.write(data)
        if size is not None:
            file.truncate(size)


def header_of(path):
    """(header dict, data bytes) of a valid safetensors file."""
    with open(path, "rb") as file:
        blob = file.read()
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def deep_json(depth):
    return "[" * depth + "]" * depth


# ---- the corpus ------------------------------------------------------------------------------------

def tinyclip_folder(root, name):
    folder = os.path.join(root, name)
    checkpoint.save(CLIP(preset("tiny"), seed=1), folder)
    return folder


def hf_folder(root, name):
    """A Hugging Face SigLIP folder of tiny shapes, in Hugging Face's names and layouts."""
    config = preset("tiny", class_token=False, vision_pre_norm=False, patch_bias=True, vision_pooling="map",
                    vision_projection=False, embed_dim=16, causal=False, text_pooling="last",
                    text_projection_bias=True, activation="gelu_tanh", ln_eps=1e-6, init_bias=-10.0)
    model = CLIP(config, seed=2)
    state, packed = {}, {}
    for key, value in model.state_dict().items():
        hf_key = checkpoint.hf_name(key, "siglip")
        kind, shape = checkpoint.hf_layout(key, value.shape, config)
        if kind == "patch":
            p = config.patch_size
            state[hf_key] = value.reshape(value.shape[0], p, p, 3).transpose(0, 3, 1, 2)
        elif kind in ("q", "k", "v"):
            packed.setdefault(hf_key, {})[kind] = value
        else:
            state[hf_key] = value.reshape(shape)
    for hf_key, parts in packed.items():
        state[hf_key] = numpy.concatenate([parts["q"], parts["k"], parts["v"]])
    folder = os.path.join(root, name)
    os.makedirs(folder)
    tower = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    hf_config = {"model_type": "siglip",
                 "vision_config": {**tower, "image_size": 16, "patch_size": 8},
                 "text_config": {**tower, "vocab_size": 64, "max_position_embeddings": 8, "projection_size": 16}}
    with open(os.path.join(folder, "config.json"), "w") as file:
        json.dump(hf_config, file)
    checkpoint.write_safetensors(os.path.join(folder, "model.safetensors"), state)
    return folder, hf_config


def build(root):
    """Write every case under ``root`` (an empty folder); the list of Cases."""
    cases = []

    def weights_case(name, edit, valid_file=False):
        """A tinyclip folder whose model.safetensors ``edit(path, header, data)`` rewrites; unless the file is a
        valid safetensors file whose fault is only in what it holds, read_safetensors must refuse it too."""
        folder = tinyclip_folder(root, name)
        path = os.path.join(folder, "model.safetensors")
        header, data = header_of(path)
        edit(path, header, data)
        cases.append(Case(name, "load", folder, path))
        if not valid_file:
            cases.append(Case(name + "-read", "read_safetensors", path, path))

    def shifted(key, offsets):
        def edit(path, header, data):
            header[key]["data_offsets"] = offsets(header)
            raw_safetensors(path, header, data)
        return edit

    # 1. offsets: negative, overlapping, out of order, leaving a hole; data longer or shorter than they cover
    weights_case("offsets-negative", shifted("log_scale", lambda h: [-8, -4]))
    weights_case("offsets-overlap", shifted("log_scale", lambda h: h["text.ln_final.bias"]["data_offsets"]))
    weights_case("offsets-reversed", shifted("log_scale", lambda h: h["log_scale"]["data_offsets"][::-1]))
    weights_case("offsets-past-the-end", shifted("log_scale", lambda h: [10**9, 10**9 + 4]))
    weights_case("trailing-bytes", lambda path, header, data: raw_safetensors(path, header, data + bytes(64)))
    weights_case("truncated-data", lambda path, header, data: raw_safetensors(path, header, data[:-4]))
    # 2. a file much larger than its weights: a valid header, then 30 GB of (sparse) nothing
    weights_case("sparse-30GB-tail", lambda path, header, data: raw_safetensors(path, header, data,
                                                                                size=SPARSE_BYTES))

    def huge_tensor(path, header, data):      # a header that covers 30 GB exactly, with one shape that does not fit
        end = header["text.token_embedding.weight"]["data_offsets"]
        extra = SPARSE_BYTES - len(data)
        for entry in header.values():
            if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end[1]:
                entry["data_offsets"] = [entry["data_offsets"][0] + extra, entry["data_offsets"][1] + extra]
        header["text.token_embedding.weight"]["data_offsets"] = [end[0], end[1] + extra]
        header["text.token_embedding.weight"]["shape"] = [(end[1] + extra - end[0]) // 4]
        raw_safetensors(path, header, b"", size=8 + len(json.dumps(header).encode()) + SPARSE_BYTES)
    weights_case("sparse-30GB-tensor", huge_tensor, valid_file=True)
    # 3. sizes that overflow or do not divide, dtypes unknown or not floating point, headers that are not
    weights_case("shape-overflows", lambda path, header, data: (
        header["log_scale"].update(shape=[2**62, 2**3]), raw_safetensors(path, header, data)))
    weights_case("bytes-not-a-multiple", lambda path, header, data: (
        header["log_scale"].update(shape=[2], dtype="F32", data_offsets=[header["log_scale"]["data_offsets"][0],
                                                                           header["log_scale"]["data_offsets"][0] + 6]),
        raw_safetensors(path, header, data)))
    weights_case("unknown-dtype", lambda path, header, data: (
        header["log_scale"].update(dtype="F7"), raw_safetensors(path, header, data)))
    weights_case("integer-weights", lambda path, header, data: (
        header["log_scale"].update(dtype="I32"), raw_safetensors(path, header, data)), valid_file=True)
    weights_case("header-deeply-nested", lambda path, header, data: raw_safetensors(
        path, deep_json(DEEP).encode(), data))
    weights_case("header-a-list", lambda path, header, data: raw_safetensors(path, b"[]", data))
    weights_case("header-not-utf8", lambda path, header, data: raw_safetensors(path, b"\xff\xfe{}", data))
    weights_case("header-length-past-the-end", lambda path, header, data: raw_safetensors(
        path, header, data, length=10**6))
    weights_case("header-length-huge", lambda path, header, data: raw_safetensors(path, header, data,
                                                                                  length=2**63))
    weights_case("empty-file", lambda path, header, data: open(path, "wb").close())
    weights_case("no-metadata-object", lambda path, header, data: (
        header.update(__metadata__="x"), raw_safetensors(path, header, data)))

    # 4. config.json (tinyclip's format): huge, zero, of the wrong type, unknown choices, deep, not a regular file
    def config_case(name, edit):
        folder = tinyclip_folder(root, name)
        path = os.path.join(folder, "config.json")
        with open(path) as file:
            document = json.load(file)
        text = edit(document)
        with open(path, "w") as file:
            file.write(text if isinstance(text, str) else json.dumps(document))
        cases.append(Case(name, "load", folder, path))

    def field(name, value):
        return lambda document: document["config"].update({name: value})

    for name, value in (("vision_width", 2**20), ("embed_dim", 2**31), ("vision_layers", 10**6),
                        ("patch_size", 0), ("vision_heads", 0), ("text_heads", -2), ("vision_width", "16"),
                        ("vision_mlp_ratio", "4"), ("class_token", "yes"), ("activation", "swish"),
                        ("vision_pooling", ["cls"]), ("conv_channels", "abc"), ("eos_id", -1),
                        ("vocab_size", 1.5), ("ln_eps", 0.0), ("init_bias", "x"), ("image_size", 17)):
        config_case(f"config-{name}-{_label(value)}", field(name, value))
    config_case("config-a-string", lambda document: document.update(config="abc"))
    config_case("config-missing", lambda document: document.pop("config"))
    config_case("config-format-a-list", lambda document: document.update(tinyclip_format=[1]))
    config_case("config-nan", lambda document: json.dumps(document).replace('"ln_eps": 1e-05', '"ln_eps": NaN'))
    config_case("config-inf-width", lambda document: json.dumps(document).replace('"vision_width": 16',
                                                                                  '"vision_width": 1e400'))
    config_case("config-long-integer", lambda document: json.dumps(document).replace('"vision_width": 16',
                                                                                     '"vision_width": ' + "9" * 5000))
    config_case("config-deeply-nested", lambda document: deep_json(DEEP))
    config_case("config-a-list", lambda document: "[]")
    config_case("config-not-json", lambda document: "{'config': 1}")
    config_case("config-too-large", lambda document: " " * (checkpoint.MAX_CONFIG_BYTES + 1) + "{}")

    # 5. Hugging Face configs
    def hf_case(name, edit):
        folder, hf_config = hf_folder(root, name)
        edit(hf_config)
        path = os.path.join(folder, "config.json")
        with open(path, "w") as file:
            json.dump(hf_config, file)
        cases.append(Case(name, "from_pretrained", folder, path))

    def hf_field(section, name, value):
        return lambda config: (config[section] if section else config).update({name: value})

    for section, name, value in (("vision_config", "hidden_size", "16"), ("vision_config", "patch_size", 0),
                                 ("vision_config", "num_attention_heads", 0), ("text_config", "hidden_size", 0),
                                 ("text_config", "num_hidden_layers", 10**6), ("text_config", "projection_size", 2**31),
                                 ("vision_config", "hidden_size", 2**20), ("vision_config", "hidden_act", 5),
                                 ("vision_config", "layer_norm_eps", "x"), ("vision_config", "vision_use_head", "yes"),
                                 ("text_config", "vocab_size", None), ("text_config", "eos_token_id", "2"),
                                 ("vision_config", "image_size", 20), ("text_config", "intermediate_size", 1.5),
                                 (None, "vision_config", "abc"), (None, "model_type", ["siglip"])):
        hf_case(f"hf-{section or 'top'}-{name}-{_label(value)}", hf_field(section, name, value))

    def clip_projection(config):
        config.clear()
        config.update(model_type="clip", projection_dim=2**31)
    hf_case("hf-clip-projection_dim-2**31", clip_projection)

    # a valid Hugging Face config whose shapes the weights do not have
    folder, hf_config = hf_folder(root, "hf-weights-do-not-fit")
    hf_config["text_config"]["intermediate_size"] = 32        # an MLP half as wide as the weights' 
    with open(os.path.join(folder, "config.json"), "w") as file:
        json.dump(hf_config, file)
    cases.append(Case("hf-weights-do-not-fit", "from_pretrained", folder, os.path.join(folder, "model.safetensors")))

    # shards: an index that is not one, or that names a shard that is not there
    for name, index in (("index-a-list", {"weight_map": ["model-1.safetensors"]}),
                        ("index-missing-shard", {"weight_map": {"log_scale": "../../elsewhere.safetensors"}}),
                        ("index-deeply-nested", None)):
        folder = tinyclip_folder(root, name)
        os.remove(os.path.join(folder, "model.safetensors"))
        path = os.path.join(folder, "model.safetensors.index.json")
        with open(path, "w") as file:
            file.write(deep_json(DEEP) if index is None else json.dumps(index))
        cases.append(Case(name, "load", folder, path))

    # 6. tokenizers
    def tokenizer_case(name, text):
        path = os.path.join(root, name + ".json")
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        cases.append(Case(name, "tokenizer", path, path))

    good = {"format": FORMAT, "version": FORMAT_VERSION, "special_tokens": [SOT, EOT], "merges": [["a", "b"]]}
    tokenizer_case("tokenizer-deeply-nested", deep_json(DEEP))
    tokenizer_case("tokenizer-merges-deeply-nested", json.dumps({**good, "merges": "@"}).replace('"@"', deep_json(DEEP)))
    tokenizer_case("tokenizer-nan", json.dumps(good).replace('"version": 1', '"version": NaN'))
    tokenizer_case("tokenizer-merges-not-pairs", json.dumps({**good, "merges": [["a", "b", "c"]]}))
    path = os.path.join(root, "tokenizer-too-large.json")
    raw_safetensors(path, b"", size=SPARSE_BYTES)         # 30 GB of zero bytes, sparse
    cases.append(Case("tokenizer-too-large", "tokenizer", path, path))
    path = os.path.join(root, "bpe-bomb.txt.gz")          # a few MB of gzip that inflates past the cap
    with gzip.open(path, "wb", compresslevel=1) as file:
        chunk = b"a b\n" * (1 << 18)
        for _ in range(MAX_MERGES_BYTES // len(chunk) + 2):
            file.write(chunk)
    cases.append(Case("bpe-bomb", "bpe", path, path))

    # 7. files that are not regular files: a FIFO (opening it would wait for a writer forever), a link to
    # /dev/zero (endless), a directory, where a config, weights or a tokenizer should be
    for kind in ("fifo", "dev-zero", "directory"):
        for part in ("config.json", "model.safetensors"):
            folder = tinyclip_folder(root, f"{kind}-{part}")
            path = os.path.join(folder, part)
            os.remove(path)
            _special(kind, path)
            cases.append(Case(f"{kind}-{part}", "load", folder, path, pipe=kind == "fifo"))
        for loader, suffix in (("tokenizer", ".json"), ("bpe", ".txt")):
            path = os.path.join(root, f"{kind}-{loader}{suffix}")
            _special(kind, path)
            cases.append(Case(f"{kind}-{loader}", loader, path, path, pipe=kind == "fifo"))
    return cases


def _label(value):
    return re.sub(r"[^\w.-]", "_", repr(value))[:12]


def _special(kind, path):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    else:
        os.mkdir(path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    os.makedirs(sys.argv[1], exist_ok=True)
    for case in build(sys.argv[1]):
        print(f"{case.name:45s} {case.loader:17s} {case.at_fault}")
