"""A tiny HookedTransformer with hand-set weights where exactly one head retrieves.

Two attention-only layers over a word-level vocabulary; the residual stream is split into
named one-hot subspaces [token | previous token | output | position]:
- L0H0 (previous-token head) writes each position's previous token into `prev`;
- L1H2 (the planted retrieval head, an induction head) attends from the current token to
  the earliest position j whose previous token equals it, and copies token j into `out`,
  which the unembedding reads: the model continues any sequence it has seen, answer included;
- L1H1 (a decoy, duplicate-token head) attends to the earliest earlier copy of the current
  token itself: inside the answer span, but never the token about to be emitted. It scores
  0 under the true rule and ~1 under an off-by-one rule;
- L1H0 looks at the previous position; every other head has zero weights (uniform attention).
Only L1H2 writes to `out`; the decoys write nothing, so generation depends on L1H2 alone.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from rh_lens.tasks.needles import Needle

PLANTED = (1, 2)
DECOY = (1, 1)
N_CTX = 256

NEEDLE = Needle(
    needle="The secret code is: alpha bravo charlie delta echo.",
    question="What is the secret code?",
    real_needle="alpha bravo charlie delta echo",
)
HAYSTACK_WORDS = "river stone cloud maple window garden lamp orange violin paper silver forest candle".split()
TEMPLATE_WORDS = "Based on the content of the book , Question : What is secret code ? Answer The . <book> </book>".split()


def haystack_text(n_sentences: int = 40, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    sentences = []
    for _ in range(n_sentences):
        picks = torch.randint(len(HAYSTACK_WORDS), (5,), generator=generator)
        sentences.append(" ".join(HAYSTACK_WORDS[i] for i in picks) + ".")
    return " ".join(sentences)


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "[EOS]"] + sorted(set(TEMPLATE_WORDS + HAYSTACK_WORDS + NEEDLE.real_needle.split() + ["<", ">", "/"]))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


def build_planted_model(strength: float = 100.0) -> HookedTransformer:
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    tok, prev, out = (slice(i * vocab, (i + 1) * vocab) for i in range(3))
    pos = slice(3 * vocab, 3 * vocab + N_CTX)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=3 * vocab + N_CTX,
        n_ctx=N_CTX,
        d_head=N_CTX + 1,
        n_heads=4,
        d_vocab=vocab,
        attn_only=True,
        act_fn=None,
        normalization_type=None,
        positional_embedding_type="standard",
        use_attn_scale=False,
        model_name="planted",
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    eye_v, eye_p = torch.eye(vocab), torch.eye(N_CTX)
    earliest = -0.1 * torch.arange(N_CTX, dtype=torch.float)  # prefer the earliest match, by less than one match is worth
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, tok] = eye_v
        model.pos_embed.W_pos[:, pos] = eye_p
        model.unembed.W_U[out, :] = eye_v

        l0 = model.blocks[0].attn  # previous-token head: query at p matches key at p - 1
        l0.W_Q[0, pos, :N_CTX] = eye_p * strength
        l0.W_K[0, pos, :N_CTX] = torch.roll(eye_p, 1, dims=1)  # key j -> slot j + 1
        l0.W_V[0, tok, :vocab] = eye_v
        l0.W_O[0, :vocab, prev] = eye_v

        l1 = model.blocks[1].attn
        l1.W_Q[0, pos, :N_CTX] = eye_p * strength  # L1H0: previous position, writes nothing
        l1.W_K[0, pos, :N_CTX] = torch.roll(eye_p, 1, dims=1)
        for head, key_space in ((DECOY[1], tok), (PLANTED[1], prev)):
            l1.W_Q[head, tok, :vocab] = eye_v * strength
            l1.W_K[head, key_space, :vocab] = eye_v
            l1.b_Q[head, N_CTX] = 1.0
            l1.W_K[head, pos, N_CTX] = earliest
        l1.W_V[PLANTED[1], tok, :vocab] = eye_v
        l1.W_O[PLANTED[1], :vocab, out] = eye_v * strength
    return model


def weakened_planted_model(divisor: float) -> HookedTransformer:
    """The planted model with its retrieval head's whole query (weights and bias) divided by
    `divisor`: its attention, that much softer, spreads over the haystack. Multiplying that
    head's attention scores by `divisor` gives the original scores back."""
    model = build_planted_model()
    attn = model.blocks[PLANTED[0]].attn
    with torch.no_grad():
        attn.W_Q[PLANTED[1]] /= divisor
        attn.b_Q[PLANTED[1]] /= divisor
    return model


def write_inputs(directory) -> tuple[str, str]:
    """A haystack directory and a needles file for the command line: (haystack, needles)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    (directory / "hay").mkdir(exist_ok=True)
    (directory / "hay" / "text.txt").write_text(haystack_text())
    (directory / "needles.jsonl").write_text(json.dumps(NEEDLE.__dict__) + "\n")
    return str(directory / "hay"), str(directory / "needles.jsonl")
