"""Tests for SigLIP's SentencePiece tokenizer (tinyclip.tokenizer.SiglipTokenizer) and zero-shot with it.

The SentencePiece model is trained here, in a fraction of a second, from a
few hundred generated captions; nothing downloads. Where transformers is
installed its ``SiglipTokenizer`` on the same file is the reference (ids
equal), and a random ``SiglipModel`` saved to a folder with that file runs
through ``tinyclip zeroshot`` (probabilities equal to transformers').
"""

import io
import json
import random

import numpy
import pytest

from tinyclip import tokenizer as tokenizer_module
from tinyclip.cli import main
from tinyclip.tokenizer import SiglipTokenizer, canonicalize_text, find_tokenizer

sentencepiece = pytest.importorskip("sentencepiece")

WORDS = ("a photo of the cat dog bird red blue green small large circle square triangle on in with two three "
         "café naïve über straße résumé 2024 100 x-ray it's").split()

CAPTIONS = [
    "A photo of a cat.",
    "  Two   DOGS,  on the  GRASS!!  ",
    "a red circle; a blue square? (and a green triangle)",
    "Café naïve über Straße — résumé",
    "ÜBER café: 2024 & 100%",
    "x-ray of it's a dog's \"bird\" [sic] {ok} <tag>",
    "emoji 🐱 and 漢字 and ﬁ ligature",
    "digits 0123456789 and 3.14159",
    "",
    "...",
    "\u2581leading underline and trailing\u2581",
    "tab\tand\nnewline",
    " ".join(["cat dog bird"] * 40),                     # longer than any context here
]


@pytest.fixture(scope="module")
def spiece_file(tmp_path_factory):
    """A small unigram SentencePiece model laid out like SigLIP's (pad 0, </s> 1, <unk> 2, no <s>)."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(600)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                             vocab_size=120, hard_vocab_limit=False, pad_id=0, eos_id=1,
                                             unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2)
    path = tmp_path_factory.mktemp("spiece") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def hf_siglip_tokenizer(path, monkeypatch):
    """transformers' SiglipTokenizer on ``path``.

    Its constructor insists on protobuf, which transformers uses only with
    ``legacy=False`` (to switch off the model's dummy prefix); SigLIP's
    tokenizer runs with the default ``legacy=True``, so without protobuf the
    check is lifted rather than the comparison skipped.
    """
    pytest.importorskip("transformers")
    from transformers.models.siglip import tokenization_siglip
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        monkeypatch.setattr(tokenization_siglip, "requires_backends", lambda *args, **kwargs: None)
    return tokenization_siglip.SiglipTokenizer(str(path))


def test_canonicalisation_is_siglips():
    assert canonicalize_text("  A Photo, of a CAT!  ") == "a photo of a cat"
    assert canonicalize_text("Café — l'été") == "café — lété"          # only ASCII punctuation goes
    assert canonicalize_text("tab\tand\n\nnewline") == "tab and newline"
    assert canonicalize_text("MiXeD", lowercase=False) == "MiXeD"
    assert canonicalize_text("...") == ""


def test_padding_end_token_and_truncation(spiece_file):
    tokenizer = SiglipTokenizer.from_file(spiece_file)
    eos = tokenizer.eot_id
    assert eos == 1 and tokenizer.vocab_size == sentencepiece.SentencePieceProcessor(
        model_file=str(spiece_file)).get_piece_size()
    tokens = tokenizer(["a cat", " ".join(["cat dog bird"] * 40)], context_length=12)
    assert tokens.shape == (2, 12) and tokens.dtype == numpy.int64
    length = len(tokenizer.encode("a cat"))
    assert length >= 2 and (tokens[0, length:] == eos).all() and (tokens[0, :length] != eos).all()
    assert tokens[1, -1] == eos and (tokens[1, :-1] != eos).all()     # cut to 11 ids, then the end token
    assert tokenizer.decode(tokens[0]) == "a cat"
    assert tokenizer("A CAT!!", 12).tolist() == tokens[:1].tolist()   # canonicalised first


def test_bad_inputs_and_files_are_named(spiece_file, tmp_path):
    tokenizer = SiglipTokenizer.from_file(spiece_file)
    with pytest.raises(ValueError, match="context_length"):
        tokenizer(["a"], context_length=0)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        tokenizer(["a", 3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([10_000])
    broken = tmp_path / "spiece.model"
    broken.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="spiece.model"):
        SiglipTokenizer.from_file(broken)
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        SiglipTokenizer.from_file(tmp_path / "nothing.model")


def test_save_and_find_in_a_model_folder(spiece_file, tmp_path):
    tokenizer = SiglipTokenizer.from_file(spiece_file)
    tokenizer.save(tmp_path / tokenizer_module.SPIECE_FILE)
    assert (tmp_path / "spiece.model").read_bytes() == spiece_file.read_bytes()
    found = find_tokenizer(tmp_path)
    assert isinstance(found, SiglipTokenizer)
    assert found(CAPTIONS, 16).tolist() == tokenizer(CAPTIONS, 16).tolist()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert find_tokenizer(tmp_path).lowercase is False
    assert find_tokenizer(tmp_path / "missing") is None


@pytest.mark.parity
@pytest.mark.parametrize("context_length", [64, 8])
def test_ids_equal_transformers(spiece_file, context_length, monkeypatch):
    reference = hf_siglip_tokenizer(spiece_file, monkeypatch)
    ours = SiglipTokenizer.from_file(spiece_file)
    expected = reference(CAPTIONS, padding="max_length", truncation=True, max_length=context_length).input_ids
    assert ours(CAPTIONS, context_length=context_length).tolist() == expected
    for caption in CAPTIONS:
        assert ours.encode(caption) == reference(caption, add_special_tokens=False).input_ids


# ---- zero-shot end to end on a Hugging Face SigLIP folder ----------------------------------------

def write_images(folder, size, count=2):
    from PIL import Image
    rng = numpy.random.default_rng(0)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=numpy.uint8)
        paths.append(str(folder / f"image{index}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.mark.parity
def test_zeroshot_on_a_hugging_face_siglip_folder_equals_transformers(spiece_file, tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from PIL import Image
    hf_tokenizer = hf_siglip_tokenizer(spiece_file, monkeypatch)
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    text = {"vocab_size": hf_tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16}
    reference = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
    folder = tmp_path / "siglip"
    reference.save_pretrained(folder)
    (folder / "spiece.model").write_bytes(spiece_file.read_bytes())
    images = write_images(tmp_path, 32)
    labels = ["cat", "red dog", "Blue Triangle!"]

    assert main(["zeroshot", "--model", str(folder), "--images", *images, "--labels", *labels, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scores"] == "sigmoid" and result["labels"] == labels

    prompts = [f"a photo of a {label}." for label in labels]   # the default template of both families
    input_ids = hf_tokenizer(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    pixels = numpy.stack([numpy.asarray(Image.open(path), dtype=numpy.float32) / 255 for path in images])
    pixel_values = torch.from_numpy(((pixels - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())   # (B, 3, H, W)
    with torch.no_grad():
        logits = reference(input_ids=input_ids.input_ids, pixel_values=pixel_values).logits_per_image
    expected = torch.sigmoid(logits).numpy()                                               # (images, labels)
    ours = numpy.array([[result["images"][path][label] for label in labels] for path in images])
    numpy.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)

    assert main(["zeroshot", "--model", str(folder), "--images", *images, "--labels", *labels]) == 0
    captured = capsys.readouterr()
    assert "sigmoid" in captured.err and len(captured.out.strip().splitlines()) == len(images)
