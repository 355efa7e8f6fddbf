"""ChatML prompts from a bundle's chat template, without a template engine. Pure.

The device does not run Jinja. It supports the ChatML family of templates (SmolLM2, Qwen
and others): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n``. When the template inserts a default system message before a
conversation that has none (SmolLM2's does), that message is taken from the template text
and inserted the same way. A template of another family is refused at load time.

Message content is inserted verbatim: text such as ``<|im_end|>`` inside a message is
read by the tokenizer as that control token, exactly as the Jinja template would.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from agent.errors import ModelError

START = "<|im_start|>"
END = "<|im_end|>"
_ROLE = re.compile(r"^[a-z][a-z_]{0,31}$")
_DEFAULT_SYSTEM = re.compile(
    r"!= *'system' *%\}\{\{ *'<\|im_start\|>system\n(?P<text>[^'\\]*)<\|im_end\|>\n' *\}\}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A parsed ChatML template."""

    default_system: str | None

    @classmethod
    def parse(cls, template: str) -> ChatTemplate:
        """Recognize a ChatML template.

        Raises:
            ModelError: the template is not of the ChatML family.
        """
        if START not in template or END not in template or "add_generation_prompt" not in template:
            raise ModelError(
                "the bundle's chat template is not a ChatML template "
                "(<|im_start|>role ... <|im_end|>); this runtime renders only ChatML"
            )
        match = _DEFAULT_SYSTEM.search(template)
        return cls(default_system=match.group("text") if match else None)

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """Return the prompt for ``(role, content)`` pairs, ending with the assistant header.

        Raises:
            ValueError: no messages, or a role that is not a lowercase word.
        """
        if not messages:
            raise ValueError("messages must not be empty")
        parts: list[str] = []
        if self.default_system is not None and messages[0][0] != "system":
            parts.append(f"{START}system\n{self.default_system}{END}\n")
        for i, (role, content) in enumerate(messages):
            if not _ROLE.match(role):
                raise ValueError(f"messages[{i}].role {role!r} is not a lowercase word")
            parts.append(f"{START}{role}\n{content}{END}\n")
        parts.append(f"{START}assistant\n")
        return "".join(parts)
