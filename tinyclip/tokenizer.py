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
import tempfile
from collections import Counter, defaultdict

import ftfy
import numpy
import regex

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_NUM_MERGES = 49152 - 256 - 2        # the merges CLIP uses from bpe_simple_vocab_16e6.txt.gz
FORMAT, FORMAT_VERSION = "tinyclip-bpe", 1
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
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPE merges file not found: {path!r} (CLIP's is bpe_simple_vocab_16e6.txt.gz; "
                                    f"tinyclip never downloads it)")
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as stream:
                lines = stream.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as error:
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
        directory = os.path.dirname(os.path.abspath(path))
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
                json.dump(document, stream, ensure_ascii=False)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path):
        """A tokenizer written by ``save``."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as stream:
                document = json.load(stream)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file not found: {path!r}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
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

