"""Qwen3's reasoning split: `<think>` blocks into reasoning_content, whole and streamed alike."""

import random

import pytest

from gateway.reasoning import ReasoningDelta, ReasoningStream, split_reasoning


def test_a_think_block_is_reasoning_and_the_rest_content():
    text = "<think>\nThe user wants the capital.\n</think>\n\nParis is the capital of France."
    assert split_reasoning(text) == ("The user wants the capital.", "Paris is the capital of France.")


def test_output_without_a_think_block_is_all_content():
    assert split_reasoning("Paris.") == (None, "Paris.")
    assert split_reasoning("  Paris.\n") == (None, "  Paris.\n")  # verbatim: there is no tag to strip around
    assert split_reasoning("") == (None, None)


def test_think_tags_later_in_the_output_are_content():
    # Only an output that opens with <think> (or a prompt that did) has a think block.
    text = "I say <think>hmm</think> a lot."
    assert split_reasoning(text) == (None, text)
    assert split_reasoning("done</think>rest") == (None, "done</think>rest")


def test_a_prompt_that_opened_the_block_makes_the_output_reasoning_up_to_its_end():
    text = "Thinking about it.\n</think>\n\nParis."
    assert split_reasoning(text, in_reasoning=True) == ("Thinking about it.", "Paris.")
    # The model repeating the opening tag changes nothing.
    assert split_reasoning("<think>" + text, in_reasoning=True) == ("Thinking about it.", "Paris.")


def test_an_unclosed_block_was_cut_short_and_is_all_reasoning():
    assert split_reasoning("<think>\nStill thinking") == ("Still thinking", None)
    assert split_reasoning("Still thinking", in_reasoning=True) == ("Still thinking", None)


def test_empty_parts_are_none():
    # Qwen3 with nothing to think about still writes an empty block.
    assert split_reasoning("<think>\n\n</think>\n\nHi!") == (None, "Hi!")
    assert split_reasoning("<think>\nThought.\n</think>\n\n") == ("Thought.", None)
    assert split_reasoning("<think></think>") == (None, None)


def test_only_the_first_closing_tag_ends_the_block():
    text = "<think>a</think>b</think>c"
    assert split_reasoning(text) == ("a", "b</think>c")


SAMPLES = [
    ("<think>\nThe user wants the capital.\n</think>\n\nParis is the capital of France.", False),
    ("<think>\n\n</think>\n\nHi!", False),
    ("<think>\nline one\n\nline two  \n</think>\n\nAnswer\n\nwith  gaps \n", False),
    ("<think>\nStill thinking about <, </, </th and </thinking", False),
    ("<think>a</think>b</think>c", False),
    ("<think></think>", False),
    ("<think>", False),
    ("<thin", False),
    ("<thin", True),
    ("<thinking> is not a tag", False),
    ("< think>", False),
    ("Plain answer with a </think> and <think> inside.", False),
    ("  \n", False),
    ("", False),
    ("", True),
    ("Reasoning from the prompt's block.\n</think>\n\nThe answer.", True),
    ("<think>\nrepeated opening\n</think>\nThe answer.", True),
    ("unclosed reasoning from the prompt  \n", True),
    ("ünïcødé 思考 🙂\n</think>\n\n答え 🚀", True),
]


def _stream(chunks: list[str], in_reasoning: bool) -> tuple[str | None, str | None]:
    stream = ReasoningStream(in_reasoning=in_reasoning)
    deltas = [stream.feed(chunk) for chunk in chunks] + [stream.finish()]
    assert all(isinstance(delta, ReasoningDelta) for delta in deltas)
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    return reasoning or None, content or None


def _chunkings(text: str, seed: int) -> list[list[str]]:
    """Every way to cut text once, one character at a time, and random cuts."""
    ways = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    ways.append(list(text))
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return ways


@pytest.mark.parametrize(("text", "in_reasoning"), SAMPLES)
def test_streaming_any_chunking_gives_the_whole_text_split(text, in_reasoning):
    expected = split_reasoning(text, in_reasoning=in_reasoning)
    for chunks in _chunkings(text, seed=len(text)):
        assert _stream(chunks, in_reasoning) == expected, chunks


def test_reasoning_streams_before_the_block_closes():
    stream = ReasoningStream()
    assert stream.feed("<thi") == ReasoningDelta("", "")  # might be the tag
    assert stream.feed("nk>\nFirst") == ReasoningDelta("First", "")  # leading newline dropped
    assert stream.feed(" step.\n") == ReasoningDelta(" step.", "")  # trailing newline waits
    assert stream.feed("Second.</") == ReasoningDelta("\nSecond.", "")  # "</" may start </think>
    assert stream.feed("think>\n\nAns") == ReasoningDelta("", "Ans")
    assert stream.feed("wer.") == ReasoningDelta("", "wer.")
    assert stream.finish() == ReasoningDelta("", "")


def test_content_streams_at_once_when_there_is_no_block():
    stream = ReasoningStream()
    assert stream.feed("<") == ReasoningDelta("", "")
    assert stream.feed("b>bold</b>") == ReasoningDelta("", "<b>bold</b>")
    assert stream.feed(" </think>") == ReasoningDelta("", " </think>")
