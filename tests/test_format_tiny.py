"""The token format (DESIGN.md section 3) with the tiny tokenizer: appending turns gives exactly the tokens
its chat template renders for the whole conversation; masks mark exactly the agent's tokens."""

from __future__ import annotations

from transformers import AutoTokenizer

from common import tiny
from common.episode import ENV, STUDENT, TEACHER, Episode, collate, end_of_turn_id, first_prompt_ids


def test_appended_episode_equals_the_template_rendering():
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    eot = end_of_turn_id(tok)
    system, observations = "You play a game. Reply <action>ACTION</action>.", ["You are in the kitchen.", "You see a coin.", "Done."]
    replies = ["<action>look around</action>", "I see it. <action>take coin</action>"]
    ep = Episode.start(tok, system, observations[0])
    messages = [{"role": "system", "content": system}, {"role": "user", "content": observations[0]}]
    for k, reply in enumerate(replies):
        ep.append_reply(tok.encode(reply, add_special_tokens=False) + [eot], STUDENT if k == 0 else TEACHER, eot)
        ep.append_observation(tok, observations[k + 1])
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": observations[k + 1]}]
    rendered = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert ep.ids == rendered
    # the trained tokens are exactly the replies with their closing <|im_end|>
    trained = [t for t, m in zip(ep.ids, ep.loss_mask) if m]
    assert trained == sum((tok.encode(r, add_special_tokens=False) + [eot] for r in replies), [])
    assert {r for r, m in zip(ep.role, ep.loss_mask) if m} == {STUDENT, TEACHER}
    assert all(r == ENV for r, m in zip(ep.role, ep.loss_mask) if not m)
    assert sorted({t for t in ep.turn_id if t >= 0}) == [0, 1] and ep.turns == 2
    assert ep.prompt_len == len(first_prompt_ids(tok, system, observations[0]))


def test_reply_cut_at_max_new_tokens_gets_an_untrained_closing_token():
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    eot = end_of_turn_id(tok)
    ep = Episode.start(tok, "s", "o")
    cut = tok.encode("<action>take", add_special_tokens=False)
    ep.append_reply(cut, STUDENT, eot)
    assert ep.ids[-1] == eot and ep.loss_mask[-1] == 0 and sum(ep.loss_mask) == len(cut)


def test_collate_pads_right_and_keeps_masks():
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    eot = end_of_turn_id(tok)
    a, b = Episode.start(tok, "s", "short"), Episode.start(tok, "s", "a much longer observation here")
    a.append_reply([eot], STUDENT, eot)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(a), len(b)))
    assert batch["attention_mask"][0].sum() == len(a) and batch["loss_mask"][0].sum() == 1
    assert batch["loss_mask"][1].sum() == 0
