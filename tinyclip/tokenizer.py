"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, section 2.4), and training a small one from captions.

The algorithm is byte-pair encoding (Sennrich et al. 2016) over bytes, as in
GPT-2, with CLIP's choices, matching OpenAI's ``clip/simple_tokenizer.py``
and open_clip's ``SimpleTokenizer`` id for id:

* cleanup, OpenAI's ``basic_clean`` then ``whitespace_clean``: ``ftfy.fix_text``
  (curly quotes and apostrophes to straight ones, NFC, ligatures and
  full-width letters unfolded, mojibake repaired, control characters
  dropped), HTML entities unescaped twice, stripped, runs of whitespace
  collapsed to one space, stripped, lowercased. ftfy is a required
  dependency: without it "it’s" would tokenise differently from "it's";

* pre-tokenisation by ``PATTERN``: the two special tokens, the English
  contraction suffixes, runs of letters, single digits, runs of anything
  else but whitespace. Whitespace itself is never a token: every word
  instead ends in the marker ``</w>``, so a decoded text has a space after
  every pre-token (``"a cat."`` comes back as ``"a cat . "``);
* each pre-token's UTF-8 bytes spelt with ``bytes_to_unicode`` (printable
  stand-ins for the 256 bytes), then merged pair by pair, always the pair
  ranked first in the merge list, until no ranked pair is left.

Vocabulary layout (CLIP's): ids 0-255 the byte symbols, 256-511 the same
followed by ``</w>``, then one id per merge in rank order, then
``<|startoftext|>`` and ``<|endoftext|>``. With CLIP's 48,894 merges that is
49,408 ids, start 49406, end 49407. Padding is id 0, which is also the byte
``!``: only the zeros after an end-of-text id are padding.
"""

import functools
import gzip
import heapq
import html
import itertools
import json
import os
import string
import zlib
from collections import Counter, defaultdict

import ftfy
import numpy
import regex
import sentencepiece

from . import files

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_NUM_MERGES = 49152 - 256 - 2        # the merges CLIP uses from bpe_simple_vocab_16e6.txt.gz
FORMAT, FORMAT_VERSION = "tinyclip-bpe", 1
MAX_MERGES_BYTES = 16 * 2**20            # a merges file's text (CLIP's is 1.4 MB); files from outside are capped
MAX_TOKENIZER_BYTES = 16 * 2**20         # a saved tokenizer (CLIP-sized: about 1.5 MB of JSON)
CACHE_LIMIT = 100_000                    # pre-tokens remembered before the cache starts over

# case-insensitive as CLIP's; one side effect, kept for exactness: U+0345 (a combining mark that case-folds
# to iota) is matched by no branch, so it is dropped
PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                        r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
WHITESPACE = regex.compile(r"\s+")


@functools.cache
def bytes_to_unicode():
    """Byte value → a printable character standing for it: {0..255} → 256 distinct characters.

    Printable Latin-1 bytes stand for themselves; the others (control
    characters, space, the no-break space and soft hyphen) are moved to
    U+0100 onwards in byte order, so no symbol is whitespace and the merges
    file can separate symbols by spaces.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    moved = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(moved)})
    # the order of the table (printable bytes first) is the order of ids 0-255
    return {byte: table[byte] for byte in [*printable, *moved]}


def clean_text(text):
    """CLIP's text cleanup: ftfy, HTML unescaped twice, whitespace collapsed, stripped, lowercased (str → str)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()   # twice: captions scraped from HTML are often escaped twice
    return WHITESPACE.sub(" ", text).strip().lower()


def pre_tokens(text):
    """The pieces of an already cleaned text that BPE encodes one at a time."""
    return PATTERN.findall(text)


def base_symbols():
    """The 512 symbols every vocabulary starts with: the byte symbols, then the same ending a word."""
    symbols = list(bytes_to_unicode().values())
    return symbols + [symbol + END_OF_WORD for symbol in symbols]


def word_symbols(token):
    """A pre-token as its byte symbols, the last one marking the end of the word: 'hi' → ('h', 'i</w>')."""
    byte_encoder = bytes_to_unicode()
    symbols = [byte_encoder[byte] for byte in token.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return symbols


def merge_pair(symbols, first, second):
    """Every non-overlapping occurrence of (first, second), left to right, replaced by first + second."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def checked_texts(texts):
    """A str as a list of one; otherwise a list of str, or a ValueError naming the first that is not."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] must be a str, got {type(text).__name__}: {text!r:.80}")
    return list(texts)



def _write_atomically(path, data):
    """Write the bytes ``data`` to ``path`` through ``files.staged_file``: a temporary file beside it,
    flushed, then renamed over it, so that a reader never sees half a tokenizer."""
    with files.staged_file(path) as temporary, open(temporary, "xb") as stream:
        stream.write(data)


class Tokenizer:
    """Text → CLIP token ids: ``tok(texts, context_length=77)`` gives an int64 array (len(texts), context_length).

    Built from a merge list, ranked best first: ``Tokenizer.from_bpe_file`` for
    CLIP's published file, ``Tokenizer.train`` for a small vocabulary learned
    from captions, ``Tokenizer.load`` for one saved with ``save``.
    """

    def __init__(self, merges):
        self.merges = [tuple(merge) for merge in merges]
        vocab = base_symbols() + ["".join(merge) for merge in self.merges] + [SOT, EOT]
        # as in CLIP, a symbol listed twice keeps its later id
        self.encoder = {symbol: index for index, symbol in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {merge: rank for rank, merge in enumerate(self.merges)}
        self.byte_decoder = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
        self.cache = {}   # pre-token → its ids

    @classmethod
    def from_bpe_file(cls, path, num_merges=CLIP_NUM_MERGES):
        """CLIP's tokenizer from its merges file (``bpe_simple_vocab_16e6.txt.gz``); never downloads anything.

        The file is text, gzipped when its name ends in ``.gz``: a version
        header line, then one merge ``a b`` per line, best first. CLIP uses
        the first 48,894 merges; a Hugging Face CLIP folder's ``merges.txt``
        holds the same list uncompressed.
        """
        path = os.fspath(path)
        try:
            with files.open_regular(path, "BPE merges file") as raw:
                stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
                data = files.read_capped(stream, MAX_MERGES_BYTES)   # a gzip bomb is not inflated past the cap
        except FileNotFoundError:
            raise FileNotFoundError(f"BPE merges file not found: {path!r} (CLIP's is bpe_simple_vocab_16e6.txt.gz; "
                                    f"tinyclip never downloads it)") from None
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"cannot read BPE merges file {path!r}: expected UTF-8 text, gzipped for .gz "
                             f"({error})") from None
        if len(data) > MAX_MERGES_BYTES:
            raise ValueError(f"BPE merges file {path!r} holds more than {MAX_MERGES_BYTES:,} bytes of text; "
                             f"CLIP's has 1.4 MB")
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError as error:
            raise ValueError(f"cannot read BPE merges file {path!r}: expected UTF-8 text, gzipped for .gz "
                             f"({error})") from None
        merges = []
        for number, line in enumerate(lines[1:num_merges + 1], start=2):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"BPE merges file {path!r}, line {number}: expected two symbols, got {line!r}")
            merges.append(tuple(parts))
        return cls(merges)

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn merges from captions until the vocabulary has ``vocab_size`` ids (at least 514: 512 base + 2 special).

        Pairs of adjacent symbols are counted over the distinct pre-tokens,
        each weighted by how often it occurs; the most frequent pair is merged
        next, ties going to the pair that sorts first, so the result depends
        only on the multiset of texts. Training stops early once every word is
        a single symbol. Counts are updated only for the words that contain the
        merged pair, and a heap with stale entries skipped finds the best pair.
        """
        texts = checked_texts(texts)
        minimum = len(base_symbols()) + 2
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(f"vocab_size must be an integer >= {minimum} (512 byte symbols + 2 special tokens), "
                             f"got {vocab_size!r}")
        counts = Counter(token for text in texts for token in pre_tokens(clean_text(text)) if token not in (SOT, EOT))
        words = [word_symbols(token) for token in counts]
        frequency = list(counts.values())
        pair_counts = Counter()
        pair_words = defaultdict(set)             # pair → the words it occurred in (possibly no longer)
        for index, symbols in enumerate(words):
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += frequency[index]
                pair_words[pair].add(index)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)
        known = set(base_symbols())
        merges, wanted = [], vocab_size - minimum
        while heap and len(merges) < wanted:
            negative_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -negative_count:
                continue                          # stale: the count changed and was pushed again
            del pair_counts[pair]
            if "".join(pair) in known:
                continue                          # the symbol exists already: one id per symbol, as in CLIP's file
            known.add("".join(pair))
            merges.append(pair)
            changed = set()
            for index in pair_words.pop(pair):
                old = words[index]
                new = merge_pair(old, *pair)
                if len(new) == len(old):
                    continue
                words[index] = new
                weight = frequency[index]
                for old_pair in itertools.pairwise(old):
                    if old_pair != pair:
                        pair_counts[old_pair] -= weight
                        changed.add(old_pair)
                for new_pair in itertools.pairwise(new):
                    pair_counts[new_pair] += weight
                    pair_words[new_pair].add(index)
                    changed.add(new_pair)
            for changed_pair in changed:
                count = pair_counts.get(changed_pair, 0)
                if count > 0:
                    heapq.heappush(heap, (-count, changed_pair))
                else:
                    pair_counts.pop(changed_pair, None)
        return cls(merges)

    def save(self, path):
        """Write the merges as plain JSON, atomically: a temporary file beside ``path``, then renamed over it."""
        path = os.fspath(path)
        document = {"format": FORMAT, "version": FORMAT_VERSION, "special_tokens": [SOT, EOT],
                    "merges": [list(merge) for merge in self.merges]}
        _write_atomically(path, json.dumps(document, ensure_ascii=False).encode("utf-8"))

    @classmethod
    def load(cls, path):
        """A tokenizer written by ``save``."""
        path = os.fspath(path)
        try:
            document = files.read_json(path, what="tokenizer file", max_bytes=MAX_TOKENIZER_BYTES)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file not found: {path!r}") from None
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read tokenizer file {path!r}: expected tinyclip's JSON ({error})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a tinyclip tokenizer file (no \"format\": {FORMAT!r})")
        if document.get("version") != FORMAT_VERSION or document.get("special_tokens") != [SOT, EOT]:
            raise ValueError(f"{path!r}: unsupported tokenizer version {document.get('version')!r} or special tokens "
                             f"{document.get('special_tokens')!r}; expected version {FORMAT_VERSION} with {[SOT, EOT]}")
        merges = document.get("merges")
        if not isinstance(merges, list) or not all(isinstance(merge, list) and len(merge) == 2 and
                                                   all(isinstance(symbol, str) for symbol in merge)
                                                   for merge in merges):
            raise ValueError(f"{path!r}: \"merges\" must be a list of [symbol, symbol] pairs")
        return cls(merges)

    def bpe(self, token):
        """A pre-token → its symbols: the best-ranked adjacent pair merged until no ranked pair is left."""
        symbols = word_symbols(token)
        while len(symbols) > 1:
            pair = min(itertools.pairwise(symbols), key=lambda candidate: self.ranks.get(candidate, len(self.ranks)))
            if pair not in self.ranks:
                break
            symbols = merge_pair(symbols, *pair)
        return symbols

    def token_ids(self, token):
        """The ids of one pre-token, remembered: captions repeat a small set of words."""
        ids = self.cache.get(token)
        if ids is None:
            ids = [self.encoder[token]] if token in (SOT, EOT) else [self.encoder[symbol] for symbol in self.bpe(token)]
            if len(self.cache) >= CACHE_LIMIT:
                self.cache.clear()
            self.cache[token] = ids
        return ids

    def encode(self, text):
        """One text → its ids, without start and end tokens."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
        ids = []
        for token in pre_tokens(clean_text(text)):
            ids.extend(self.token_ids(token))
        return ids

    def decode(self, ids):
        """Ids → text: start and end tokens dropped, as is the padding after an end token; '</w>' becomes a space."""
        if numpy.ndim(ids) != 1:
            raise ValueError(f"ids must be one sequence of token ids, got an array of shape {numpy.shape(ids)}")
        symbols, ended = [], False
        for token_id in ids:
            token_id = int(token_id)
            if token_id not in self.decoder:
                raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} ids")
            if token_id == self.eot_id:
                ended = True
            elif token_id != self.sot_id and not (ended and token_id == 0):
                symbols.append(self.decoder[token_id])
        # as CLIP: bytes first, then '</w>' replaced in the decoded text (a space has no byte symbol of its own)
        data = bytes(self.byte_decoder[character] for character in "".join(symbols))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts, context_length=77):
        """Texts → (len(texts), context_length) int64: start, ids, end, then 0s; too long keeps the end token last."""
        texts = checked_texts(texts)
        if isinstance(context_length, bool) or not isinstance(context_length, (int, numpy.integer)) \
                or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2 (room for the start and end tokens), "
                             f"got {context_length!r}")
        tokens = numpy.zeros((len(texts), context_length), dtype=numpy.int64)   # (B, T), 0 = padding
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)][:context_length - 1] + [self.eot_id]
            tokens[row, :len(ids)] = ids
        return tokens

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"



# ---------------------------------------------------------------------------------
# SigLIP's SentencePiece tokenizer
# ---------------------------------------------------------------------------------

SPIECE_FILE = "spiece.model"            # the name SigLIP checkpoints (and transformers) give the model file
SPIECE_UNDERLINE = "\u2581"             # "▁", SentencePiece's word-start mark
SIGLIP_EOS = "</s>"                     # transformers' SiglipTokenizer: end of text, also the padding token
ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text, lowercase=True):
    """SigLIP's text canonicalisation: lowercased, ASCII punctuation removed, whitespace collapsed, stripped.

    big_vision's ``_canonicalize`` and transformers' ``SiglipTokenizer.canonicalize_text``:
    only the 32 characters of ``string.punctuation`` go ("café, l'été!" → "café lété"); other
    symbols and every non-ASCII character stay for SentencePiece's own NFKC normalisation.
    """
    if lowercase:
        text = text.lower()
    text = WHITESPACE.sub(" ", text.translate(ASCII_PUNCTUATION))
    return text.strip()


class SiglipTokenizer:
    """Text → SigLIP token ids with a SentencePiece model: ``tok(texts, context_length=64)`` → int64 array.

    Id for id transformers' ``SiglipTokenizer`` called with ``padding="max_length",
    truncation=True`` (and so what its ``SiglipProcessor`` gives the model):

    * each text gets a leading word mark "▁", then ``canonicalize_text``
      (so leading whitespace is one extra "▁" piece, as there);
    * SentencePiece encodes it *without* its own dummy prefix: transformers
      encodes ``unk_piece + text`` and drops the ids of ``unk_piece`` alone,
      which works whether or not the model file adds a prefix;
    * ids are cut to ``context_length - 1``, then ``</s>`` is appended, then
      rows are padded with ``</s>`` as well: SigLIP's text tower reads the
      last position, which therefore always holds an end-of-text token's
      features for texts that fit.

    Not reproduced: transformers first splits a text on the literal strings of
    its special tokens ("</s>", "<unk>") and keeps those as single ids; here
    their brackets are punctuation and are removed like any other.
    """

    def __init__(self, model_proto, lowercase=True, name="<bytes>"):
        self.model_proto = bytes(model_proto)
        self.lowercase = lowercase
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(self.model_proto)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{name} is not a SentencePiece model file: {error}") from None
        self.vocab_size = self.processor.get_piece_size()
        self.eot_id = self.processor.piece_to_id(SIGLIP_EOS)
        if self.eot_id == self.processor.unk_id():
            raise ValueError(f"{name}: the SentencePiece model has no {SIGLIP_EOS!r} piece, SigLIP's end of text")
        self.unk_piece = self.processor.id_to_piece(self.processor.unk_id())
        self.unk_length = len(self.processor.encode(self.unk_piece))

    @classmethod
    def from_file(cls, path, lowercase=True):
        """The tokenizer of a SentencePiece model file (a SigLIP folder's ``spiece.model``)."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as stream:
                proto = stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"SentencePiece model file not found: {path!r}") from None
        return cls(proto, lowercase=lowercase, name=repr(path))

    def encode(self, text):
        """One text → its ids, without the end token."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
        text = canonicalize_text(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), self.lowercase)
        ids = self.processor.encode(self.unk_piece + text)
        return ids[self.unk_length:] if len(ids) >= self.unk_length else ids

    def decode(self, ids):
        """Ids → text; end-of-text ids (and so the padding) are dropped."""
        if numpy.ndim(ids) != 1:
            raise ValueError(f"ids must be one sequence of token ids, got an array of shape {numpy.shape(ids)}")
        kept = []
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} ids")
            if token_id != self.eot_id:
                kept.append(token_id)
        return self.processor.decode(kept)

    def __call__(self, texts, context_length=64):
        """Texts → (len(texts), context_length) int64: ids, ``</s>``, then ``</s>`` as padding.

        A text too long keeps its first ``context_length - 1`` ids and the ``</s>``.
        """
        texts = checked_texts(texts)
        if isinstance(context_length, bool) or not isinstance(context_length, (int, numpy.integer)) \
                or context_length < 1:
            raise ValueError(f"context_length must be an integer >= 1 (room for the end token), "
                             f"got {context_length!r}")
        tokens = numpy.full((len(texts), context_length), self.eot_id, dtype=numpy.int64)   # (B, T)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:context_length - 1]
            tokens[row, :len(ids)] = ids
        return tokens

    def save(self, path):
        """Write the SentencePiece model file, atomically (a temporary file beside ``path``, then renamed)."""
        path = os.fspath(path)
        _write_atomically(path, self.model_proto)

    def __repr__(self):
        return f"SiglipTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


# the files a model folder may hold its tokenizer in, in the order they are looked for
TOKENIZER_FILE = "tokenizer.tinyclip.json"      # tinyclip's own tokenizer file in a model folder
TOKENIZER_FILES = (TOKENIZER_FILE, SPIECE_FILE, "merges.txt", "bpe_simple_vocab_16e6.txt.gz")


def load_tokenizer(path):
    """The tokenizer in the file ``path``, by its kind: tinyclip's JSON (BPE), a SentencePiece ``.model``
    (SigLIP), or a CLIP merges file (``merges.txt``, ``bpe_simple_vocab_16e6.txt.gz``)."""
    path = os.fspath(path)
    if path.endswith(".json"):
        return Tokenizer.load(path)
    if path.endswith(".model"):
        return SiglipTokenizer.from_file(path, lowercase=_hf_lowercase(os.path.dirname(path)))
    return Tokenizer.from_bpe_file(path)


def find_tokenizer(folder):
    """The tokenizer saved in a model folder: the first of ``TOKENIZER_FILES`` there, or None.

    A published SigLIP folder holds ``spiece.model``, a CLIP one ``merges.txt``,
    a model trained by tinyclip ``tokenizer.tinyclip.json``: so the model's
    family (and its history) picks the tokenizer.
    """
    for name in TOKENIZER_FILES:
        path = os.path.join(os.fspath(folder), name)
        if os.path.isfile(path):
            return load_tokenizer(path)
    return None


def _hf_lowercase(folder):
    """``do_lower_case`` from a Hugging Face folder's tokenizer_config.json (transformers' default: True)."""
    path = os.path.join(folder, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path!r}: {error}") from None
    value = document.get("do_lower_case", True) if isinstance(document, dict) else None
    if not isinstance(value, bool):
        raise ValueError(f"{path!r}: do_lower_case must be true or false, got {value!r}")
    return value
