"""A synthetic retrieval task for models trained from scratch, in the NIAH trials' own form.

Word-level vocabulary: filler words (`f00`, ...), keys (`k00`, ...) and the words of the
prompt template. A haystack is filler sentences; the needle is
"The code of k07 is f12 f03 f40 f33 f08 ." and the question "What is the code of k07 ?",
asked after the haystack with `QUESTION_TEMPLATE`, exactly as `build_trial` asks it. So a
model trained here is scored by the same `detect`, masked by the same `ablate` machinery
and patched by the same `patch` machinery as a real one. The answer's words are filler
words: a head cannot find the answer by its kind of token, it has to find the needle.

Training sequences are built at the token level (fast, thousands per second) and are the
token ids `build_trial` gives for the same haystack, needle and insertion point, followed by
the answer and EOS (a test holds the two together). Like a trial's haystack, the filler is
cut to a token count, mostly mid-sentence: a model trained only on whole sentences learns
that the question follows a full stop, and fails every trial. `retrieval=False` makes the
control task: the same sequences, but the answer after the question is drawn afresh, so
nothing in the context predicts it and nothing rewards looking back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rh_lens.tasks.needles import Needle
from rh_lens.tasks.niah import QUESTION_TEMPLATE, Trial, build_trial

# The words of QUESTION_TEMPLATE and of the needle sentence.
TEMPLATE_WORDS = "Based on the content of book , Question : What is code ? Answer The .".split()


@dataclass(frozen=True)
class SyntheticTask:
    """The vocabulary and the shapes of haystack, needle and answer."""

    n_filler: int = 48  # filler words: a haystack's sentences are random draws of them
    n_keys: int = 32
    answer_tokens: int = 5  # one copy event is worth 1/5 of the answer: one lucky argmax does not reach 0.1 twice
    sentence_words: int = 5  # filler words per haystack sentence (then ".")

    def words(self) -> list[str]:
        return (
            ["[UNK]", "[EOS]"]
            + TEMPLATE_WORDS
            + [f"f{i:02d}" for i in range(self.n_filler)]
            + [f"k{i:02d}" for i in range(self.n_keys)]
        )

    def tokenizer(self):
        """A word-level fast tokenizer (whitespace and punctuation split) with EOS."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(self.words())}, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")

    def needle(self, generator: torch.Generator) -> Needle:
        key = int(torch.randint(self.n_keys, (1,), generator=generator))
        values = torch.randint(self.n_filler, (self.answer_tokens,), generator=generator).tolist()
        answer = " ".join(f"f{v:02d}" for v in values)
        return Needle(f"The code of k{key:02d} is {answer} .", f"What is the code of k{key:02d} ?", answer)

    def haystack(self, n_sentences: int, generator: torch.Generator) -> str:
        words = torch.randint(self.n_filler, (n_sentences, self.sentence_words), generator=generator)
        return " ".join(" ".join(f"f{w:02d}" for w in row) + " ." for row in words.tolist())

    def trials(self, tokenizer, n: int, context_lengths: tuple[int, ...], seed: int, n_ctx: int | None = None) -> list[Trial]:
        """`n` held-out trials per context length (a `Trial` counts the question budget of
        `QUESTION_BUDGET` tokens in its length), needles at evenly spread depths."""
        generator = torch.Generator().manual_seed(seed)
        trials = []
        for length in context_lengths:
            haystack_ids = tokenizer(self.haystack(length // self.sentence_words + 1, generator), add_special_tokens=False)[
                "input_ids"
            ]
            for i in range(n):
                depth = round(100 * i / max(1, n - 1))
                trials.append(
                    build_trial(
                        tokenizer,
                        haystack_ids,
                        self.needle(generator),
                        length,
                        depth,
                        chat=False,
                        max_tokens=n_ctx,
                        haystack="synthetic",
                    )
                )
        return trials


def sequence_ids(tokenizer, filler_ids: list[int], needle: Needle, at: int, answer: str | None = None) -> tuple[list[int], int]:
    """The token ids of a training sequence: filler with the needle inserted after token `at`
    (a sentence end), the question, the answer (the needle's, or `answer`) and EOS; and the
    position of the first answer token. The prompt part equals `build_trial`'s."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = (
        filler_ids[:at] + encode(needle.needle) + filler_ids[at:] + encode(QUESTION_TEMPLATE.format(question=needle.question))
    )
    return prompt + encode(answer if answer is not None else needle.real_needle) + [tokenizer.eos_token_id], len(prompt)


class Batches:
    """Random training batches of the task. As in a NIAH prompt, the filler is cut to a
    token count (drawn per batch, so a batch has one length), often mid-sentence, and the
    needle goes in at a sentence end or at the very end."""

    def __init__(self, task: SyntheticTask, tokenizer, min_filler: int, max_filler: int, retrieval: bool = True):
        self.task, self.tokenizer, self.retrieval = task, tokenizer, retrieval
        self.min_filler, self.max_filler = min_filler, max_filler
        vocab = tokenizer.get_vocab()
        self.filler = torch.tensor([vocab[f"f{i:02d}"] for i in range(task.n_filler)])
        self.full_stop = vocab["."]

    def __call__(self, batch_size: int, generator: torch.Generator) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """(token ids, answer mask: True where the next token is an answer token or EOS)."""
        task, sentence = self.task, self.task.sentence_words + 1
        n_tokens = int(torch.randint(self.min_filler, self.max_filler + 1, (1,), generator=generator))
        n_sentences = -(-n_tokens // sentence)
        points = list(range(0, n_tokens, sentence)) + [n_tokens]  # sentence ends, and the end
        rows, masks = [], []
        for _ in range(batch_size):
            picks = self.filler[torch.randint(task.n_filler, (n_sentences, sentence - 1), generator=generator)]
            filler = torch.cat([picks, torch.full((n_sentences, 1), self.full_stop)], dim=1).flatten()[:n_tokens].tolist()
            at = points[int(torch.randint(len(points), (1,), generator=generator))]
            needle = task.needle(generator)
            answer = None if self.retrieval else task.needle(generator).real_needle
            ids, start = sequence_ids(self.tokenizer, filler, needle, at, answer)
            mask = [False] * len(ids)
            mask[start - 1 : len(ids) - 1] = [True] * (len(ids) - start)
            rows.append(ids)
            masks.append(mask)
        return torch.tensor(rows), torch.tensor(masks)


def tiny_model(
    task: SyntheticTask,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 64,
    attn_only: bool = True,
    n_ctx: int = 256,
    seed: int = 0,
    positions: str = "rotary",
) -> HookedTransformer:
    """A small HookedTransformer from scratch (LayerNorm; rotary or learned "standard"
    positions), seeded, with the task's tokenizer (a fresh one: TransformerLens edits the
    tokenizer it is given)."""
    tokenizer = task.tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=None if attn_only else 4 * d_model,
        attn_only=attn_only,
        act_fn=None if attn_only else "gelu",
        normalization_type="LN",
        n_ctx=n_ctx,
        d_vocab=len(tokenizer),
        positional_embedding_type=positions,
        rotary_dim=d_model // n_heads,
        seed=seed,
        model_name="synthetic",
        device="cpu",
    )
    return HookedTransformer(cfg, tokenizer=tokenizer)


def train_step(
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
    ids: Int[Tensor, "batch pos"],
    answer_mask: Bool[Tensor, "batch pos"],
    answer_weight: float = 0.0,
) -> tuple[float, float]:
    """One optimiser step on next-token loss over every position, plus `answer_weight` times
    the loss on the answer tokens (in a long filler the answer is a few percent of the
    tokens); returns (loss over every position, loss on the answer tokens alone: the part
    only retrieval can lower)."""
    model.train()
    logits = model(ids, return_type="logits")[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1
    )
    answer = answer_mask[:, :-1]
    loss = losses.mean()
    optimizer.zero_grad(set_to_none=True)
    (loss + answer_weight * losses[answer].mean()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    model.eval()
    return float(loss.detach()), float(losses.detach()[answer].mean())
