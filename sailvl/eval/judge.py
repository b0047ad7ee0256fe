"""The optional judge: an OpenAI-compatible model asked for the answer when the task's rules cannot
extract one (off unless configured; the report counts the items that used it).

Multiple choice: the judge sees the question, the options and the reply, and names the chosen letter
(or Z), which `extract_choice` then reads, as VLMEvalKit does with its GPT matcher. Other tasks: the
judge is asked for the reply's final short answer."""

from __future__ import annotations

from .endpoint import ChatClient
from .items import EvalItem
from .metrics import extract_choice

CHOICE_TEMPLATE = (
    "You are given a multiple-choice question, its options and a model's reply. Decide which single option "
    "the reply chose. Output only that option's letter; output Z if the reply chose none of the options, "
    "several of them, or refused.\n\nQuestion: {question}\nOptions:\n{options}\nReply: {reply}\nLetter:")
ANSWER_TEMPLATE = (
    "You are given a question and a model's reply. Extract the reply's final answer to the question. "
    "Output only that answer, as short as possible, with no explanation; output NONE if the reply gives no "
    "answer.\n\nQuestion: {question}\nReply: {reply}\nFinal answer:")


class Judge:
    def __init__(self, client: ChatClient, max_tokens: int = 64):
        self.client, self.max_tokens = client, max_tokens

    def describe(self) -> dict:
        return {"endpoint": self.client.url, "model": self.client.model}

    def extract(self, item: EvalItem, reply: str, choice: bool) -> str | None:
        """The answer the judge reads in `reply` (a letter or "Z" for multiple choice), None if it cannot
        tell or rejects the request. EndpointError (server unreachable) propagates."""
        if choice:
            options = "\n".join(f"{k}. {v}" for k, v in item.options.items())
            prompt = CHOICE_TEMPLATE.format(question=item.question, options=options, reply=reply)
        else:
            prompt = ANSWER_TEMPLATE.format(question=item.question, reply=reply)
        try:
            out = self.client.complete(prompt, self.max_tokens).strip()
        except ValueError:
            return None
        if choice:
            return extract_choice(out, item.options)
        return None if not out or out.upper() == "NONE" else out
