"""The `chat` template: conversations (OpenAI ``messages`` or ShareGPT ``conversations``) rendered
with the model's own Jinja chat template, each assistant turn trained on its inference prompt
(`sftcore.data.chat` says how, docs/chat.md shows a run)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from sftcore import hookimpl
from sftcore.data.chat import TRAIN_ON, ChatRenderer, messages_of, probe, template_text
from sftcore.errors import UsageError

log = logging.getLogger("sftcore.run")


class ChatTemplate:
    """Template ``chat``.

    :param chat_template: a ``.jinja`` file to render with, instead of the tokenizer's own.
    :param train_on: ``assistant`` (every assistant turn), ``last`` (the last one) or ``all``
        (every token of the rendered conversation).
    :param system: a system message to put first when a conversation has none.
    :param messages_field: the row field holding OpenAI-style messages (``role``, ``content``).
    :param conversations_field: the field holding ShareGPT turns (``from``, ``value``).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        chat_template: str | None = None,
        train_on: Literal["assistant", "last", "all"] = "assistant",
        system: str | None = None,
        messages_field: str = "messages",
        conversations_field: str = "conversations",
    ) -> None:
        if train_on not in TRAIN_ON:
            raise UsageError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        if tokenizer is None:
            raise UsageError("the chat template renders with the run's tokenizer, which the host passes; build it through sft")
        text, name = template_text(tokenizer, chat_template)
        self.renderer = ChatRenderer(tokenizer, text, name)
        probe(self.renderer)
        self.train_on, self.system = train_on, system
        self.fields = (messages_field, conversations_field)
        self._split_said = False

    def format(self, example: Mapping[str, Any]) -> list:
        segments = self.renderer.segments(self.messages(example), self.train_on)
        if not self._split_said and any(s.restart for s in segments):
            self._split_said = True
            log.info(
                "chat template %s renders earlier turns differently once later turns follow: "
                "each assistant turn trains in a row of its own, with the history the model gets at inference",
                self.renderer.name,
            )
        return segments

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        """The inference prompt after the row's messages (an assistant message last is left out)."""
        messages = self.messages(example, reply=False)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.renderer.prompt(messages)

    def messages(self, example: Mapping[str, Any], reply: bool = True) -> list[dict[str, str]]:
        messages = messages_of(example, *self.fields, reply=reply, reads=self.renderer.reads, template=self.renderer.name)
        if self.system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system})
        return messages


@hookimpl
def register_templates(register):
    register("chat", ChatTemplate, description="conversations on the model's own chat template; assistant turns trained")
