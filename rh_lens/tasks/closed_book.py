"""Closed-book questions: asked with no document, answered from what the model knows.

The paper's consequential claim is that retrieval heads matter for answers copied out of a
context and much less for answers recalled from the weights. To test it, the same masking is
applied to open-book trials (SQuAD, HotpotQA) and to closed-book ones: a question alone, from
the built-in `WORLD_QUESTIONS` (facts any encyclopedia holds: capitals, authors, elements,
...), or a document task's own questions with their documents left out. Only the questions a
model answers right unmasked say anything about masking, so results are read on those
(the `retained` column of an experiment's summary).
"""

from __future__ import annotations

from rh_lens.tasks.niah import Needle, Trial, render_prompt, resolve_chat

CLOSED_BOOK_TEMPLATE = (
    "Answer the question. Only give me the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:"
)

# (question, answer): well-known facts with one short answer of 3+ letters (ROUGE-1 grading
# ignores shorter words), none of them a word of its question; people by surname, so that
# "Shakespeare" and "William Shakespeare" are both right.
WORLD_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Austria?", "Vienna"),
    ("What is the capital of Norway?", "Oslo"),
    ("What is the capital of Sweden?", "Stockholm"),
    ("What is the capital of Poland?", "Warsaw"),
    ("What is the capital of Turkey?", "Ankara"),
    ("What is the capital of South Korea?", "Seoul"),
    ("What is the capital of Thailand?", "Bangkok"),
    ("What is the capital of Argentina?", "Buenos Aires"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Cuba?", "Havana"),
    ("In which country is the city of Amsterdam?", "Netherlands"),
    ("In which country is the Eiffel Tower?", "France"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("In which country is the Taj Mahal?", "India"),
    ("In which city is the Colosseum?", "Rome"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who wrote Pride and Prejudice?", "Austen"),
    ("Who wrote the novel Nineteen Eighty-Four?", "Orwell"),
    ("Who wrote War and Peace?", "Tolstoy"),
    ("Who wrote The Adventures of Tom Sawyer?", "Twain"),
    ("Who wrote Don Quixote?", "Cervantes"),
    ("Who painted the Mona Lisa?", "Vinci"),
    ("Who painted The Starry Night?", "Gogh"),
    ("Who developed the theory of relativity?", "Einstein"),
    ("Who proposed the theory of evolution by natural selection?", "Darwin"),
    ("Who formulated the laws of motion and universal gravitation?", "Newton"),
    ("Who was the first president of the United States?", "Washington"),
    ("Who was the first person to walk on the Moon?", "Armstrong"),
    ("Who composed the Fifth Symphony that begins with four famous notes?", "Beethoven"),
    ("Who discovered penicillin?", "Fleming"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet has the most famous rings?", "Saturn"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the longest river in Africa?", "Nile"),
    ("What is the highest mountain in the world?", "Everest"),
    ("What is the largest desert in Africa?", "Sahara"),
    ("On which continent is Brazil?", "South America"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("What is the chemical element with the symbol O?", "oxygen"),
    ("What is the chemical element with the symbol Fe?", "iron"),
    ("What is the chemical element with the symbol Au?", "gold"),
    ("What is the chemical element with the symbol Na?", "sodium"),
    ("What is the hardest natural substance?", "diamond"),
    ("What is the largest mammal?", "blue whale"),
    ("What is the fastest land animal?", "cheetah"),
    ("What animal is known as the king of the jungle?", "lion"),
    ("What is the largest organ of the human body?", "skin"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("How many days are there in a leap year?", "366"),
    ("In which year did World War II end?", "1945"),
    ("In which year did the Titanic sink?", "1912"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What is the currency of Japan?", "yen"),
    ("What is the currency of the United Kingdom?", "pound"),
    ("What is the main language spoken in Mexico?", "Spanish"),
    ("Which instrument has 88 keys?", "piano"),
    ("Which company makes the iPhone?", "Apple"),
    ("Who founded Microsoft together with Paul Allen?", "Gates"),
    ("What is the name of the galaxy that contains our solar system?", "Milky Way"),
    ("What is the tallest animal in the world?", "giraffe"),
)


def closed_book_trial(tokenizer, question: str, answer: str, task: str, chat: bool | None = None) -> Trial:
    """The question alone, with no document. The trial has no answer span (nothing in the
    prompt to copy from): it serves masking and compression, not detection."""
    chat = resolve_chat(tokenizer, chat)
    prompt, special = render_prompt(tokenizer, CLOSED_BOOK_TEMPLATE.format(question=question), chat)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    needle = Needle(needle=answer, question=question, real_needle=answer)
    return Trial(0, 0, needle, f"closed-book-{task}", prompt, prompt_ids, (0, 0), chat)
