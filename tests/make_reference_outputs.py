"""Write the reference outputs in tests/fixtures/ that the default test run checks tinyclip against.

    pip install torch transformers open_clip_torch
    python tests/make_reference_outputs.py          # rewrites tests/fixtures/

The references are other people's code, run here once so that a user's
`python -m pytest` needs neither torch nor transformers (a multi-GB download):

* ``tokenizer.json``: OpenAI's ``simple_tokenizer`` (as open_clip ships it,
  with ftfy) on a small merges file, learnt from fixed captions, and the ids
  it gives for texts of every kind the tokenizer must handle: ordinary
  captions, accents, emoji, CJK, HTML entities escaped twice, and the text
  ftfy repairs (curly quotes, combining accents, ligatures, full-width
  letters, mojibake, control characters). Tested by tests/test_tokenizer.py.
* ``hf-clip/``, ``hf-clip-legacy/``, ``hf-siglip/``: small randomly
  initialised Hugging Face ``CLIPModel`` / ``SiglipModel`` (fixed seed),
  saved with ``save_pretrained`` (config.json + model.safetensors), and
  ``outputs.npz`` beside each: the inputs and what transformers computes
  from them (image and text embeddings, logit scale and bias). Tested by
  tests/test_reference_outputs.py.

The live comparisons, against whatever torch and transformers are installed,
are the ``parity`` tests: ``python -m pytest -m parity``.
"""

import gzip
import json
import pathlib
import random
import shutil
import sys
import tempfile
import unicodedata

import numpy

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ROOT = pathlib.Path(__file__).resolve().parent.parent

# every model here is small: the fixtures stay a few hundred KB in all
VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 16, "patch_size": 8}
TEXT = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 16}
KINDS = ("clip", "clip-legacy", "siglip")

TOKENIZER_CAPTIONS = [
    "a photo of a cat", "a photo of a dog on the grass", "two dogs playing in the snow", "it's raining, isn't it?",
    "we'll see 3 birds at 5:30pm", "café au lait & croissant", "naïve über résumé", "東京タワー at night",
    "🐶 and 🐱 sleeping", "a fine flower in a flat field", "full width letters", "a cat on a mat",
]


def tokenizer_texts():
    rng = random.Random(12)
    words = " ".join(TOKENIZER_CAPTIONS).split()
    varied = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(24)]
    repaired = [
        "it\u2019s raining", "\u201ca cat\u201d on \u2018a mat\u2019", unicodedata.normalize("NFD", "café naïve résumé"),
        "a \ufb01ne \ufb02ower", "\uff21 \uff50\uff48\uff4f\uff54\uff4f \uff11\uff12", "caf\u00c3\u00a9 au lait",
        "a\x07 cat\x00 on a\x1b[31m mat", "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;", "fish &amp; chips",
        "  lots   of\twhitespace\n here  ", "MIXED Case TEXT", "1920s jazz, circa 1925", "price $4.99 -- 50% off!!!",
        "Ærøskøbing", "a very long caption that goes on and on past the sixteen tokens of the short context",
        "", "   ",
    ]
    return TOKENIZER_CAPTIONS + varied + repaired


def make_tokenizer_reference():
    from open_clip.tokenizer import SimpleTokenizer   # OpenAI's simple_tokenizer.py, ftfy and all

    sys.path.insert(0, str(ROOT))
    from tinyclip.tokenizer import Tokenizer           # only to learn a small merges list: the vocabulary is data
    rng = random.Random(0)
    words = " ".join(TOKENIZER_CAPTIONS).split()
    captions = TOKENIZER_CAPTIONS + [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
                                     for _ in range(400)]
    merges = Tokenizer.train(captions, vocab_size=700).merges
    with tempfile.TemporaryDirectory() as scratch:
        path = pathlib.Path(scratch) / "bpe.txt.gz"
        with gzip.open(path, "wt", encoding="utf-8") as stream:   # no final newline: it would be a merge of nothing
            stream.write("#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges))
        reference = SimpleTokenizer(str(path))
        texts = tokenizer_texts()
        ids = [[reference.sot_token_id, *reference.encode(text), reference.eot_token_id] for text in texts]
        tokens_16 = reference(texts, context_length=16).numpy().tolist()
    document = {"source": "open_clip.tokenizer.SimpleTokenizer (OpenAI's simple_tokenizer), "
                          "written by tests/make_reference_outputs.py",
                "merges": [list(merge) for merge in merges], "texts": texts, "ids": ids, "tokens_16": tokens_16}
    (FIXTURES / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")


def hf_model(kind):
    """A small random CLIPModel or SiglipModel; "clip-legacy" pools at argmax(ids) (eos_token_id 2) as OpenAI does."""
    import transformers
    if kind.startswith("clip"):
        eos = 2 if kind == "clip-legacy" else TEXT["vocab_size"] - 1
        return transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=VISION, text_config={**TEXT, "eos_token_id": eos}, projection_dim=12))
    return transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT))


def make_model_reference(kind, seed):
    import torch
    torch.manual_seed(seed)
    model = hf_model(kind).eval()
    folder = FIXTURES / f"hf-{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    for extra in folder.iterdir():                      # only what from_pretrained reads
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    rng = numpy.random.default_rng(seed)
    images = rng.normal(size=(3, VISION["image_size"], VISION["image_size"], 3)).astype(numpy.float32)  # (B, H, W, 3)
    end = TEXT["vocab_size"] - 1
    tokens = rng.integers(1, end - 1, size=(3, TEXT["max_position_embeddings"]))
    if kind.startswith("clip"):                         # end of text (also the largest id), then padding
        tokens[0, 5], tokens[1, 9], tokens[2, 15] = end, end, end
        tokens[0, 6:], tokens[1, 10:] = 0, 0
    with torch.no_grad():
        outputs = model(input_ids=torch.from_numpy(tokens),
                        pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))   # (B, 3, H, W)
    bias = getattr(model, "logit_bias", None)
    numpy.savez_compressed(folder / "outputs.npz", images=images, tokens=tokens,
                           image_embeds=outputs.image_embeds.numpy(), text_embeds=outputs.text_embeds.numpy(),
                           logit_scale=numpy.float32(model.logit_scale.item()),
                           logit_bias=numpy.float32(numpy.nan if bias is None else bias.item()))


def main():
    FIXTURES.mkdir(exist_ok=True)
    make_tokenizer_reference()
    for seed, kind in enumerate(KINDS):
        make_model_reference(kind, seed)
    total = sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file())
    print(f"wrote {FIXTURES} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
