"""Chat templates against strings read off the original (farewellthree/PPLLaVA d5766c8).

Citations: conv.py = ppllava/conversation/conv.py; sft = ppllava/datasets/datasets/
interleave_sft_dataset.py.
"""

from __future__ import annotations

import pytest

from ppllava_jax.data.text.templates import (
  CHATML,
  TEMPLATES,
  VICUNA,
  VICUNA_V1,
  Turn,
  render_conversation,
  render_generation_prompt,
  with_media,
)


def test_registry_names_are_the_originals():
  # conv.py conv_templates: "plain_v1" (Vicuna scripts), "plain_qwen" (Qwen scripts);
  # "vicuna_v1": LLaVA's, which the original's DPO script names (data.dpo.rows).
  assert TEMPLATES == {"plain_v1": VICUNA, "plain_qwen": CHATML, "vicuna_v1": VICUNA_V1}


def test_vicuna_generation_prompt():
  # conv.py:105 conv_plain_v1 roles ("USER: ", "ASSISTANT: "), sep (" ", "</s>"), system "";
  # get_prompt (conv.py:55) puts "role + message + sep" for the user, then the assistant
  # role and the prefix without a separator.
  prompt = render_generation_prompt(VICUNA, "What is shown?", "Best option:(")
  assert prompt.text == "USER: <image>\nWhat is shown? ASSISTANT: Best option:("
  # assistant_response(None) appends "" (_append_message): the prompt ends with a space.
  assert render_generation_prompt(VICUNA, "Hi").text == "USER: <image>\nHi ASSISTANT: "


def test_chatml_generation_prompt_has_no_system_block():
  # conv.py:133 conv_plain_qwen: system "", roles "<|im_start|>user\n" /
  # "<|im_start|>assistant\n", both seps "<|im_end|>\n", mm_token "<image>\n".
  prompt = render_generation_prompt(CHATML, "Describe it.", "The best answer is:")
  assert prompt.text == (
    "<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\nThe best answer is:"
  )


def test_system_text_is_closed_by_the_user_separator():
  # get_prompt: ret = system + sep[roles[0]] when system != "" (no role tag of its own).
  assert render_generation_prompt(VICUNA, "q", system="Be brief.").text == (
    "Be brief. USER: <image>\nq ASSISTANT: "
  )
  assert render_generation_prompt(CHATML, "q", system="Be brief.").text == (
    "Be brief.<|im_end|>\n<|im_start|>user\n<image>\nq<|im_end|>\n<|im_start|>assistant\n"
  )


@pytest.mark.parametrize(
  "question, expected",
  [
    ("plain", "<image>\nplain"),  # conv.py:85 prepend mm_str
    ("<image>\nkept", "<image>\nkept"),  # mm_token already in the query
    ("left <image> right", "left <image>\n right"),  # conv.py:83 replace "<image>"
    ("<image><image> two", "<image>\n<image>\n two"),  # str.replace: every occurrence
  ],
)
def test_media_placeholder_rules(question, expected):
  assert with_media(VICUNA, question) == expected


def _original_char_labels(text: str, user: str, assistant: str) -> tuple[list[bool], list[int]]:
  """sft:176-193 with one token per character: split on the assistant role, the first
  piece masked, in each middle piece the part before the next user role (rstrip ' ')
  supervised, the last piece supervised whole. Returns the mask and piece ends."""
  pieces = text.split(assistant)
  pieces = [p + assistant for p in pieces[:-1]] + [pieces[-1]]
  labels = [False] * len(pieces[0])
  for piece in pieces[1:-1]:
    answer = len(piece.split(user)[0].rstrip(" "))
    labels += [True] * answer + [False] * (len(piece) - answer)
  labels += [True] * len(pieces[-1])
  ends, total = [], 0
  for piece in pieces[:-1]:
    total += len(piece)
    ends.append(total)
  return labels, ends


@pytest.mark.parametrize("template", [VICUNA, CHATML], ids=lambda t: t.name)
def test_training_spans_match_the_original_masking(template):
  turns = [
    Turn("What happens?", "A dog runs."),
    Turn("Then?", "It sits."),
    Turn("Colour?", "Brown"),
  ]
  rendered = render_conversation(template, turns)
  labels, piece_ends = _original_char_labels(rendered.text, template.user, template.assistant)
  mine = [any(a <= i < b for a, b in rendered.supervised) for i in range(len(rendered.text))]
  assert mine == labels
  assert list(rendered.breaks) == piece_ends


def test_vicuna_training_text_and_spans():
  # sft:81 process_qa returns get_prompt() + sep[1]; only turn 0 gets the placeholder.
  rendered = render_conversation(VICUNA, [Turn("q1", "a1"), Turn("q2", "a2")])
  assert rendered.text == "USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
  assert [rendered.text[a:b] for a, b in rendered.supervised] == ["a1</s>", "a2</s>"]
  # sft:200-205: the text encoder gets the same instruction text (BOS is added later).
  assert rendered.scorer_text == rendered.text


def test_chatml_spans_include_the_newline_after_im_end():
  rendered = render_conversation(CHATML, [Turn("q1", "a1"), Turn("q2", "a2")])
  assert [rendered.text[a:b] for a, b in rendered.supervised] == [
    "a1<|im_end|>\n",
    "a2<|im_end|>\n",
  ]
  assert rendered.text.startswith("<|im_start|>user\n<image>\nq1<|im_end|>\n")


def test_instruction_field_becomes_the_system_text():
  # sft:71: a non-empty "i" of the first turn replaces conv.system.
  rendered = render_conversation(VICUNA, [Turn("q", "a")], system="Watch closely.")
  assert rendered.text == "Watch closely. USER: <image>\nq ASSISTANT: a</s>"
  assert [rendered.text[a:b] for a, b in rendered.supervised] == ["a</s>"]


def test_an_answer_holding_a_role_tag_stays_supervised_whole():
  rendered = render_conversation(VICUNA, [Turn("q1", "say USER: hi"), Turn("q2", "ok")])
  assert [rendered.text[a:b] for a, b in rendered.supervised] == ["say USER: hi</s>", "ok</s>"]


def test_generation_history_is_rendered_as_in_training():
  history = [Turn("q1", "a1")]
  trained = render_conversation(CHATML, history).text
  prompt = render_generation_prompt(CHATML, "q2", "Answer:", history=history)
  assert prompt.text == trained + "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\nAnswer:"
  # Inference scorer text: the current question only (qabench/utils.py:119).
  assert prompt.scorer_text == "q2"
  assert render_generation_prompt(VICUNA, "q", scorer_text="q + options").scorer_text == (
    "q + options"
  )


def test_empty_conversation_is_refused():
  with pytest.raises(ValueError, match="at least one turn"):
    render_conversation(VICUNA, [])
