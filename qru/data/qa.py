"""The one question-answer template, shared by training and evaluation.

A QA record ``{"question": q, "answer": a}`` is trained on as ``format_qa(q, a)``
(``"Question: {q}\\nAnswer: {a}"``) and evaluated from the prompt ``QA_PROMPT.format(question=q)``
(``"Question: {q}\\nAnswer: "``), so ``QA_PROMPT.format(question=q) + a == format_qa(q, a)``.
"""
from __future__ import annotations

QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"
QA_PROMPT = QA_TEMPLATE.partition("{answer}")[0]  # "Question: {question}\nAnswer: "


def format_qa(question: str, answer: str) -> str:
    """The training text of a QA record."""
    return QA_TEMPLATE.format(question=question, answer=answer)


def qa_prompt(question: str) -> str:
    """The prompt of a QA record up to and including ``Answer:``, without the space that starts the
    answer: what the training text's prompt tokens decode to (a word-piece tokenizer keeps the
    space with the answer's first token), and what generation continues from."""
    return QA_PROMPT.format(question=question)[:-1]
