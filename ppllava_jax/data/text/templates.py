"""Conversation templates, as data, and the text the model and its scorer see.

Reproduces ``ppllava/conversation/conv.py`` of the original (commit d5766c8):
``Conversation.get_prompt`` / ``user_query`` with the two templates its scripts use,
``plain_v1`` (Vicuna, the released Vicuna models) and ``plain_qwen`` (ChatML, the
Qwen / LLaVA-OneVision model), and ``InterleaveBaseDataset.process_qa`` of
``ppllava/datasets/datasets/interleave_sft_dataset.py`` for training text. A third,
``vicuna_v1``, is LLaVA's ``conv_vicuna_v1`` (``llava/conversation.py``), for DPO:
the original's ``train_dpo.py`` names it, but the conversation module it imports
(``llavahound_conversation.py``) does not define it, so the released script cannot
run; LLaVA's is the evident intent (``data.dpo.rows``).

Everything here is strings; tokenising, the BOS token, truncating the scorer text to
the text encoder's limit and expanding each media placeholder to the pooled token
count are the processor's job.

Decisions, each read off the original:

- A turn is ``user + question + user_end + assistant + answer + assistant_end``:
  Vicuna ``USER: {q} ASSISTANT: {a}</s>``, ChatML
  ``<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n``.
  A prompt for generation stops after the assistant tag plus an optional prefilled
  answer prefix (``... ASSISTANT: Best option:(``); with no prefix the Vicuna prompt
  ends ``ASSISTANT: `` with its trailing space, as the original's does.
- Neither plain template has a default system prompt: ``plain_qwen`` has no
  ``<|im_start|>system`` block at all. ``vicuna_v1`` has LLaVA's system sentence,
  giving ``{system} USER: {q} ASSISTANT: {a}</s>``; a system text given explicitly
  replaces it. A system text, when given (training rows with an
  ``"i"`` field), is written bare and closed with the *user* separator, which for
  ChatML gives ``{system}<|im_end|>\\n`` without an opening tag: the original's form.
- The media placeholder is ``<image>`` for both models (also for videos and for the
  Qwen model), put only into the first question: kept if the question already holds
  ``<image>\\n``, else every ``<image>`` gets a newline after it, else ``<image>\\n`` is
  prepended. Later questions are left as they are.
- Training supervises each answer and the end marker after it (``</s>``, or
  ``<|im_end|>\\n`` newline included); everything else is masked. The original
  computes that by splitting the text on role tags and tokenising the pieces apart; here
  the spans come from construction, so an answer that happens to contain ``USER: `` is
  still supervised whole. ``breaks`` keeps where the original restarted tokenisation,
  because a SentencePiece tokenizer encodes a piece start differently (a dummy-prefix
  space after ``ASSISTANT: ``), so token ids match the released training only if the
  pieces are tokenised apart.
- Scorer (CLIP / SigLIP text) input: in training the whole conversation text, exactly
  the LLM text without BOS (roles, placeholder and answers included); at inference
  only the current question (multiple choice: what ``ppllava_jax.eval.mcq`` builds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Role tags and separators of one chat format (``Conversation`` of conv.py)."""

  name: str
  user: str  # opens a user turn
  assistant: str  # opens an assistant turn
  user_end: str  # closes a user turn, and the system text
  assistant_end: str  # closes an assistant turn; supervised with the answer
  media: str = "<image>"  # one per media item, expanded by the processor
  system: str = ""  # the system text when none is given


VICUNA = ChatTemplate(
  name="plain_v1", user="USER: ", assistant="ASSISTANT: ", user_end=" ", assistant_end="</s>"
)
CHATML = ChatTemplate(
  name="plain_qwen",
  user="<|im_start|>user\n",
  assistant="<|im_start|>assistant\n",
  user_end="<|im_end|>\n",
  assistant_end="<|im_end|>\n",
)
VICUNA_V1 = dataclasses.replace(
  VICUNA,
  name="vicuna_v1",
  system="A chat between a curious user and an artificial intelligence assistant. The "
  "assistant gives helpful, detailed, and polite answers to the user's questions.",
)
TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (VICUNA, CHATML, VICUNA_V1)}


@dataclasses.dataclass(frozen=True)
class Turn:
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class RenderedConversation:
  """A training conversation: its text and what of it is supervised.

  ``supervised``: ``[start, end)`` character spans, one per turn, each an answer and
  the end marker after it. ``breaks``: character offsets just after each assistant
  tag, where the original tokenised a new piece (see the module docstring).
  """

  text: str
  supervised: tuple[tuple[int, int], ...]
  breaks: tuple[int, ...]

  @property
  def scorer_text(self) -> str:
    """The original feeds the whole formatted conversation to the text encoder."""
    return self.text


@dataclasses.dataclass(frozen=True)
class GenerationPrompt:
  text: str  # for the LLM, ending with the assistant tag and the answer prefix
  scorer_text: str  # for the relevance scorer's text encoder


def with_media(template: ChatTemplate, question: str) -> str:
  """The first question with its placeholder(s) in place (``user_query(is_mm=True)``)."""
  tagged = template.media + "\n"
  if tagged in question:
    return question
  if template.media in question:
    return question.replace(template.media, tagged)
  return tagged + question


def _render(
  template: ChatTemplate,
  questions: Sequence[str],
  answers: Sequence[str],
  system: str,
  media: bool = True,
) -> RenderedConversation:
  """Each question in a user turn, each answer (one fewer for an open last turn) in
  an assistant turn; an unanswered question ends the text at the assistant tag.
  ``media=False`` (a text-only conversation) leaves the first question as it is."""
  system = system or template.system
  text = system + template.user_end if system else ""
  supervised: list[tuple[int, int]] = []
  breaks: list[int] = []
  for index, question in enumerate(questions):
    text += template.user + (with_media(template, question) if index == 0 and media else question)
    text += template.user_end + template.assistant
    breaks.append(len(text))
    if index < len(answers):
      start = len(text)
      text += answers[index] + template.assistant_end
      supervised.append((start, len(text)))
  return RenderedConversation(text, tuple(supervised), tuple(breaks))


def render_conversation(
  template: ChatTemplate, turns: Sequence[Turn], system: str = "", *, media: bool = True
) -> RenderedConversation:
  """A multi-turn training conversation (``process_qa``), media placeholder in turn 0.

  ``media=False``: a text-only conversation (LLaVA data has some), no placeholder added.
  """
  if not turns:
    raise ValueError("render_conversation: a conversation needs at least one turn")
  return _render(template, [t.question for t in turns], [t.answer for t in turns], system, media)


def render_generation_prompt(
  template: ChatTemplate,
  question: str,
  answer_prefix: str = "",
  *,
  scorer_text: str | None = None,
  system: str = "",
  history: Sequence[Turn] = (),
) -> GenerationPrompt:
  """The prompt the model continues: earlier turns in full, then ``question`` and the
  assistant tag followed by ``answer_prefix``.

  The scorer text defaults to ``question`` alone, as the original's free-form QA
  passes it (no history, system text, placeholder or prefix); multiple-choice
  protocols pass their own.
  """
  questions = [t.question for t in history] + [question]
  rendered = _render(template, questions, [t.answer for t in history], system)
  return GenerationPrompt(
    rendered.text + answer_prefix, question if scorer_text is None else scorer_text
  )
