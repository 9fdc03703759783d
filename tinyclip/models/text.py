"""The text tower: a transformer over token ids, as in CLIP (Radford et al. 2021) and SigLIP.

tokens (B, T) → token + position embedding → blocks (causal for CLIP) →
final layer norm → the features at one position per caption → projection.

The position is the end-of-text token: CLIP finds it as argmax of the ids
(its end-of-text id, 49407, is the largest in the vocabulary), Hugging Face
as the first occurrence of ``eos_id``; SigLIP pads every caption to full
length and takes the last position.

Only a causal tower that pools at the end-of-text token gives the same
embedding however far a caption is padded: there the pooled position sees
nothing after it. A bidirectional tower (SigLIP's) lets every position
attend to the padding, and "last" pooling reads a position that moves with
it, so such towers take tokens padded to the full ``context_length`` only,
as they were trained; shorter tokens are an error, not another embedding.
The tower does not pad them itself: the padding id is the tokenizer's
(0 for CLIP's BPE, SigLIP's SentencePiece pads with its end-of-text id).
"""

from .. import backend
from .. import nn


class TextTower(nn.Module):
    """Token ids (B, T) int, T <= context_length → text features (B, embed_dim), not yet normalised.

    T < context_length only for a causal tower pooled at the end-of-text token
    (``padding_free``); otherwise a ValueError says why T must be context_length.
    """

    def __init__(self, config, **init):
        super().__init__()
        self.config = config
        width = config.text_width
        self.token_embedding = nn.Embedding(config.vocab_size, width, std=0.02, **init)
        self.position_embedding = nn.Parameter(init["rng"].normal((config.context_length, width), std=0.01,
                                                                  dtype=init["dtype"]))
        self.transformer = nn.Transformer(width, config.text_layers, config.text_heads, config.text_mlp_ratio,
                                          config.activation, causal=config.causal, eps=config.ln_eps, **init)
        self.ln_final = nn.LayerNorm(width, config.ln_eps, **init)
        self.proj = nn.Linear(width, config.embed_dim, bias=config.text_projection_bias, **init)

    def check_tokens(self, tokens):
        """The ids as an integer array; a ValueError that says what was expected otherwise."""
        config = self.config
        ids = tokens.data if hasattr(tokens, "is_tensor") else tokens
        if not hasattr(ids, "dtype") or ids.dtype.kind not in "iu":
            raise ValueError(f"tokens must be an integer array (batch, length), got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= config.context_length or ids.shape[0] == 0:
            raise ValueError(f"tokens must have shape (batch, length) with 1 <= length <= "
                             f"{config.context_length} and batch >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] < config.context_length and not self.padding_free():
            why = ("every position attends to the padding" if not config.causal
                   else "it pools at the last position, which moves with the padding")
            raise ValueError(f"tokens: this text tower (causal={config.causal}, text_pooling={config.text_pooling!r}) "
                             f"needs captions padded to its full context of {config.context_length} tokens, got "
                             f"{ids.shape[1]}: {why}, so a shorter padding would give another embedding. "
                             f"Tokenise with context_length={config.context_length}, as SigLIP does")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(f"tokens: id {low if low < 0 else high} is outside the vocabulary of "
                             f"{config.vocab_size} ids")
        return ids

    def padding_free(self):
        """True when the embedding does not depend on how far a caption is padded: causal, pooled at end of text."""
        return self.config.causal and self.config.text_pooling in ("argmax", "eos")

    def pool_positions(self, ids):
        """The position whose features represent each caption: (B,) int."""
        xp = backend.get_array_module(ids)
        pooling = self.config.text_pooling
        if pooling == "argmax":
            return ids.argmax(axis=1)
        if pooling == "eos":   # the first end-of-text id; 0 where a caption has none, as in Hugging Face
            return (ids == self.config.eos_id).astype(xp.int32).argmax(axis=1)
        return xp.full(ids.shape[0], ids.shape[1] - 1)

    def forward(self, tokens):
        ids = self.check_tokens(tokens)
        batch, length = ids.shape
        x = self.token_embedding(ids) + self.position_embedding[:length]   # (B, T, W)
        x = self.ln_final(self.transformer(x))
        xp = backend.get_array_module(ids)
        pooled = x[xp.arange(batch), self.pool_positions(ids)]             # (B, W)
        return self.proj(pooled)
