"""The teacher's prompt: the student's problem plus privileged context and the annotator's diagnosis.

The teacher prompt is built from the prompt the student saw, with its last user turn replaced by the rendered
`teacher_context_template`; system turns and earlier turns are kept, and the result goes through the same chat
template and `chat_template_kwargs` as the student's (GRPO's own `_tokenize_prompts`). The span text is never shown.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from .annotators.base import Prompt, content_to_text


@dataclass(frozen=True)
class TeacherPrompt:
    """A teacher prompt and how it was built (for metrics and warnings)."""

    prompt: Prompt
    context_truncated: bool = False
    over_length: bool = False


class TeacherContextBuilder:
    """Render teacher prompts from a Jinja2 template and fit them into `max_length` tokens.

    Args:
        template (`str`): Jinja2 template with `problem`, `privileged_context` and `diagnosis`.
        tokenize (`Callable[[list[Prompt], list[int]], list[list[int]]]`): prompt tokenizer, given the prompts and their
            rows in the local batch; the trainer passes GRPO's `_tokenize_prompts` so student and teacher share chat
            template, tools (per row, with `environment_factory`) and `chat_template_kwargs`.
        encode_text (`Callable[[str], list[int]]`) and decode_text (`Callable[[list[int]], str]`): plain-text
            tokenizer round trip, used to cut the privileged context by tokens.
        max_length (`int` or `None`): longest teacher prompt in tokens.
    """

    def __init__(
        self,
        template: str,
        tokenize: Callable[[list[Prompt], list[int]], list[list[int]]],
        encode_text: Callable[[str], list[int]],
        decode_text: Callable[[list[int]], str],
        max_length: int | None,
    ) -> None:
        # `keep_trailing_newline` so templates ending in "\n" render exactly as written.
        self._template = jinja2.Environment(keep_trailing_newline=True).from_string(template)
        self._tokenize = tokenize
        self._encode_text = encode_text
        self._decode_text = decode_text
        self.max_length = max_length

    def render(self, prompt: Prompt, privileged_context: str | None, diagnosis: str | None) -> Prompt:
        """The teacher prompt for one rollout: `prompt` with its last user turn rewritten by the template."""
        if isinstance(prompt, str):
            return self._template.render(problem=prompt, privileged_context=privileged_context, diagnosis=diagnosis)
        messages = copy.deepcopy(list(prompt))
        user_turns = [i for i, message in enumerate(messages) if message.get("role") == "user"]
        if not user_turns:
            raise ValueError("A conversational prompt needs a user turn for the teacher context; found none.")
        last = user_turns[-1]
        problem = content_to_text(messages[last]["content"])
        text = self._template.render(problem=problem, privileged_context=privileged_context, diagnosis=diagnosis)
        messages[last] = {**messages[last], "content": _replace_text(messages[last]["content"], text)}
        return messages

    def build(
        self,
        prompts: Sequence[Prompt],
        privileged_contexts: Sequence[str | None],
        diagnoses: Sequence[str | None],
        rows: Sequence[int] | None = None,
    ) -> tuple[list[TeacherPrompt], list[list[int]]]:
        """Render and tokenize teacher prompts, cutting over-long privileged context (never the problem).

        `rows` are the prompts' rows in the local batch (default: `0..n-1`), for per-row tools.
        """
        rows = list(range(len(prompts))) if rows is None else list(rows)
        rendered = [self.render(p, c, d) for p, c, d in zip(prompts, privileged_contexts, diagnoses, strict=True)]
        ids = self._tokenize(rendered, rows) if rendered else []
        results = [TeacherPrompt(prompt) for prompt in rendered]
        if self.max_length is None:
            return results, [list(x) for x in ids]
        out_ids = [list(x) for x in ids]
        for i, row_ids in enumerate(out_ids):
            if len(row_ids) <= self.max_length:
                continue
            results[i], out_ids[i] = self._fit(prompts[i], privileged_contexts[i], diagnoses[i], len(row_ids), rows[i])
        return results, out_ids

    def _fit(
        self, prompt: Prompt, context: str | None, diagnosis: str | None, length: int, row: int
    ) -> tuple[TeacherPrompt, list[int]]:
        context_ids = self._encode_text(context or "")
        # Cut the context by the overflow, re-render, and repeat: chat templates and token merges at the cut make
        # the rendered length only approximately additive, so a couple of rounds may be needed.
        keep = len(context_ids)
        while True:
            keep = max(0, keep - (length - self.max_length))
            new_context = self._decode_text(context_ids[:keep]) if keep else None
            prompt_out = self.render(prompt, new_context, diagnosis)
            row_ids = list(self._tokenize([prompt_out], [row])[0])
            length = len(row_ids)
            if length <= self.max_length:
                return TeacherPrompt(prompt_out, context_truncated=True), row_ids
            if keep == 0:
                # The problem alone is over the limit: keep it whole rather than teach on a mutilated problem.
                return TeacherPrompt(prompt_out, context_truncated=True, over_length=True), row_ids


def _replace_text(content: Any, text: str) -> Any:
    """Replace the text of a message's content, keeping non-text parts (images) of multimodal content."""
    if isinstance(content, list):
        others = [part for part in content if not (isinstance(part, dict) and part.get("type") == "text")]
        return [*others, {"type": "text", "text": text}]
    return text
