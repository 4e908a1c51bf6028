"""Closed-book questions: asked with no document, answered from what the model knows.

The paper's consequential claim is that retrieval heads matter for answers copied out of a
context and much less for answers recalled from the weights. To test it, the same masking is
applied to open-book trials (SQuAD, HotpotQA) and to closed-book ones: a question alone, from
the built-in `rh_lens.tasks.data.WORLD_QUESTIONS` (facts any encyclopedia holds: capitals, authors, elements,
...), or a document task's own questions with their documents left out. Only the questions a
model answers right unmasked say anything about masking, so results are read on those
(the `retained` column of an experiment's summary).
"""

from __future__ import annotations

from rh_lens.tasks.needles import Needle
from rh_lens.tasks.niah import Trial, render_prompt, resolve_chat

CLOSED_BOOK_TEMPLATE = (
    "Answer the question. Only give me the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:"
)


def closed_book_trial(tokenizer, question: str, answer: str, task: str, chat: bool | None = None) -> Trial:
    """The question alone, with no document. The trial has no answer span (nothing in the
    prompt to copy from): it serves masking and compression, not detection."""
    chat = resolve_chat(tokenizer, chat)
    prompt, special = render_prompt(tokenizer, CLOSED_BOOK_TEMPLATE.format(question=question), chat)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    needle = Needle(needle=answer, question=question, real_needle=answer)
    return Trial(0, 0, needle, f"closed-book-{task}", prompt, prompt_ids, (0, 0), chat)
