"""The recipe of the embedded default's tiny models, and the code that builds them (the shipped models in
common/tiny_models were made by it; common/tiny.py loads them and imports this module only to rebuild, and for
the tests' seconds-long `smoke` models).

- a byte-level BPE tokenizer (about 1.5k tokens) trained on the games' text, with the Qwen3
  special tokens and a ChatML chat template like Qwen3's;
- one tiny Qwen3 expert per default game ("the RL expert" of the papers), trained by supervised
  learning on the games' expert trajectories, rendered in exactly the token format the scripts use;
- a smaller tiny Qwen3 student in the papers' regime, weak but able (`tiny`): a novice first, trained
  briefly on trajectories of a random valid-action policy (it knows the reply format, not the tasks), then
  given supervised steps on a slice of every game's oracle episodes, each game leaving the mix once the
  student succeeds on `able_target` of its validation seeds: a small pretrained model that acts sensibly
  and sometimes succeeds, as the papers' students do. The novice itself is `tiny-novice` (on-policy
  methods get almost no signal from it: its own episodes are mostly mistakes), and `tiny-small` a
  smaller novice.

Everything is deterministic from the recipe's seed on one machine (each model trains with one thread, so the
weights do not depend on the machine's core count; independent models build in parallel processes, and each
process shares its validation episodes with a helper process that plays them as it would), but another CPU's
float kernels build other models: that is why the built models ship. Builds are cached under
`$AGENT_DISTILL_CACHE` (default `~/.cache/agent-distill`) in folders named by a hash of what determines each
model, so a changed recipe rebuilds only what it changes. `python -m common.tiny --rebuild --out DIR` builds
every suite into DIR and exports it in the shipped layout; `--ship` then replaces the shipped models.

The same build makes tiny experts for any environment with an oracle: a suite is a recipe with its own
games, tokenizer and student (`gem`, `scienceworld`; see SUITES).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import envs
from common.episode import STUDENT, Episode, TurnCache, collate, end_of_turn_id, generate_replies, pack_by_tokens

# The games of the embedded default with their expert's optimizer steps and learning rate, chosen by
# measurement (held-out success of the tiny expert >= 90%; docs/tiny_default.md has the table). Coin is played
# with 4 rooms and no doors: with doors the same expert reached 63% (1,500 steps) and 79% (2,200).
# Tiny experts are fragile: learning comes as a sudden jump, and the same recipe with another
# initialisation seed gave peckingorder 0% or 100% after 1,500 steps; coin fell from 97% (1,000 steps)
# to 62% (2,000). So training keeps the weights that do best on validation seeds (evaluated every
# `val_every` steps after the first quarter, stopping early after two perfect scores in a row), trains
# again from another initialisation when validation stays below 90%, and reports other held-out seeds.
# A learning rate of 1e-3 made peckingorder and coin far more reliable than 3e-3 (6 of 6 first attempts
# on another machine, against 1 of 4 and 0 of 3 at 3e-3).
GAMES = (
    # (game, env spec, optimizer steps, learning rate)
    ("simonsays", "twx:simonsays", 1000, 3e-3),
    ("peckingorder", "twx:peckingorder", 4000, 1e-3),
    ("coin", "twx:coin:numLocations=4,includeDoors=0", 2000, 1e-3),
)
# Games measured and left out of the default set: held-out success of a tiny expert after 1,500 steps.
LEFT_OUT = (
    ("mapreader", "twx:mapreader", "4% (the map must be read and followed over many rooms)"),
    ("sorting", "twx:sorting", "0% (needs comparing quantities in g and kg)"),
    ("arithmetic", "twx:arithmetic", "1% (needs arithmetic)"),
    ("twc", "twx:twc", "not trained: needs common-sense knowledge of where objects belong"),
    ("cookingworld", "twx:cookingworld:numLocations=1,numIngredients=1,numDistractorItems=0",
     "24% even with one room and one ingredient"),
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
ADDED_TOKENS = ["<action>", "</action>"]  # one token each: tiny models learn the format faster


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built artefacts; its hash names the cache folder."""

    version: int = 4  # bump when the build code changes what it produces
    suite: str = "twx"  # the name of this set of games (see SUITES)
    seed: int = 0
    vocab_size: int = 1536
    games: tuple = GAMES
    left_out: tuple = ()  # (game, spec, why): measured and left out; their text still trains the tokenizer
    tokenizer_episodes: int = 40  # episodes per game and policy whose text trains the tokenizer (and oracle
    # episodes whose actions the student's random policy draws from where the env lists no valid actions)
    expert: ModelShape = ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, mlp=384)
    student: ModelShape = ModelShape(hidden=96, layers=3, heads=4, kv_heads=2, mlp=288)
    # other students, `tiny-<variant>`: (variant, shape), novices trained on random play only (weaker students
    # show whether a method's gain grows as the student shrinks, as the Guided-OPD paper reports). `novice`
    # has the default student's shape (None): the default student `tiny` is that novice made able (below).
    student_variants: tuple = (("novice", None), ("small", ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, mlp=192)))
    # more experts, `tiny-expert:<name>`, trained like the games' but not the default teacher of any env, and
    # their text does not train the tokenizer: (name, env spec, steps, lr, init, attempts). init "scratch" is
    # a new expert-shaped model; "student" starts from the suite's student (a same-origin teacher, as MOPD's).
    more_experts: tuple = ()
    expert_episodes: int = 800  # expert trajectories per game (train-split seeds)
    student_episodes: int = 300  # random-policy trajectories per game
    student_steps: int = 300
    batch_tokens: int = 1024  # tokens per optimizer step: small batches, many steps (DESIGN.md 4)
    lr: float = 5e-3  # the novice students'
    # The able student: the novice given supervised steps on oracle episodes (`able_episodes` train seeds per
    # game), round-robin over the games in the mix; every `able_val_every` steps every game is validated on
    # `able_val_episodes` seeds, and is in the mix while its success is below `able_target`. The build stops
    # when all games are at the target together, or after `able_steps`. Chosen by measurement (docs/tiny_default.md).
    able_episodes: int = 200
    able_steps: int = 3000
    able_lr: float = 5e-4
    able_target: float = 0.2
    able_val_every: int = 50
    able_val_episodes: int = 40
    max_turns: int = 20
    eval_episodes: int = 100  # held-out seeds per game for the table (seeds 0..eval_episodes-1)
    eval_batch: int = 25  # episodes played at once in evaluation (each env may be a Java process)
    val_episodes: int = 100  # seeds for choosing the best weights, disjoint from the table's and training's
    val_split: str = "heldout"  # ... taken from this split,
    val_first_seed: int = 100  # ... from this seed on
    val_every: int = 200  # optimizer steps between validations, after the first quarter of training
    expert_target: float = 0.9  # validation success an expert must reach, else it is trained again ...
    expert_attempts: int = 3  # ... from another initialisation, at most this many times (the best is kept)

    def key(self, *fields: str, **extra) -> str:
        """A hash of the recipe fields (and extra values) that determine one artefact."""
        d = dataclasses.asdict(self)
        return _hash({**{f: d[f] for f in fields}, **extra})

    def tokenizer_key(self) -> str:
        # the tokenizer is trained on the text of every game (left-out games included), not on the models
        return self.key("version", "suite", "seed", "vocab_size", "tokenizer_episodes",
                        specs=[g[1] for g in self.games] + [g[1] for g in self.left_out])

    def experts(self) -> list[tuple]:
        """Every expert as (name, spec, steps, lr, init, attempts): the games', then `more_experts`."""
        return [(g, spec, steps, lr, "scratch", self.expert_attempts) for g, spec, steps, lr in self.games] + list(self.more_experts)

    def expert_key(self, name: str) -> str:
        k = next(i for i, e in enumerate(self.experts()) if e[0] == name)
        e = self.experts()[k]
        # the games' experts keep the key they had before more_experts existed (their folders stay valid)
        recipe = (self.games[k], None) if k < len(self.games) else (e, self.student_key() if e[4] == "student" else None)
        return self.key("expert", "expert_episodes", "batch_tokens", "max_turns", "eval_episodes", "eval_batch",
                        "val_episodes", "val_split", "val_first_seed", "val_every", "expert_target",
                        *(("expert_attempts",) if k < len(self.games) else ()),
                        game=recipe[0], index=k, threads=BUILD_THREADS, **({"init": recipe[1]} if recipe[1] else {}))

    def student_key(self, variant: str = "") -> str:
        if not variant:  # the able student: the novice's key and the supervised steps that make it able
            return self.key("able_episodes", "able_steps", "able_lr", "able_target", "able_val_every",
                            "able_val_episodes", "val_split", "val_first_seed", novice=self.student_key("novice"))
        return self.key("student_episodes", "student_steps", "lr", "batch_tokens", "max_turns", "tokenizer_episodes",
                        "eval_episodes", "eval_batch", shape=dataclasses.asdict(self.student_shape(variant)), threads=BUILD_THREADS,
                        specs=[g[1] for g in self.games])

    def student_shape(self, variant: str = "") -> ModelShape:
        shapes = dict(self.student_variants)
        if variant and variant not in shapes:
            raise ValueError(f"no tiny student {'tiny-' + variant!r}; the students are: "
                             + ", ".join(["tiny"] + [f"tiny-{v}" for v in shapes]))
        return shapes.get(variant) or self.student


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# Suites: each is its own tokenizer, its experts and its student, since an expert and the student it
# teaches must share a tokenizer. `twx` is the embedded default that the scripts use with no arguments;
# the others show that any environment with an oracle gets a tiny expert (`python -m common.tiny --suite
# gem`), and the scripts pick a suite's models from --env.
# More experts of the default suite (`tiny-expert:<name>`): imperfect teachers, stopped early (coin with doors:
# 600 steps gave 0.50 held-out, 2,000 steps 1.00; coin: 600 steps gave 0.79 (500: 0.66, 800: 0.98); peckingorder
# from the able student, 130 steps: 0.77, ATOD's default teacher, above the student's 0.40 and below 1, so that a
# student can pass it (the same fine-tuning with other data orders gave 0.62 after 100 steps, 0.65 after 130, 0.99
# after 160: the skill arrives as a jump)), and same-origin teachers (each game's expert fine-tuned from the tiny
# student, as MOPD's teachers are RL-trained from the student's starting point: MOPD's default teachers).
MORE_EXPERTS = (
    # (name, env spec, optimizer steps, learning rate, init, attempts)
    ("coin-doors", "twx:coin:numLocations=4,includeDoors=1", 600, 1e-3, "scratch", 1),
    ("coin-imperfect", "twx:coin:numLocations=4,includeDoors=0", 600, 1e-3, "scratch", 1),
    *((f"{g}-same-origin", spec, steps, lr, "student", 1) for g, spec, steps, lr in GAMES),
    ("peckingorder-imperfect", "twx:peckingorder", 130, 1e-3, "student", 1),
)
SUITES = {
    "twx": Recipe(left_out=LEFT_OUT, more_experts=MORE_EXPERTS),
    # GEM has no folds: seeds are disjoint ranges per split, so the recipe's seed layout works as is
    "gem": Recipe(suite="gem", games=(("guessthenumber", "gem:guessthenumber:hard", 2000, 1e-3),), max_turns=8),
    # ScienceWorld has 120 train variations of this task (the wrapper keeps 30 more as `heldout`): experts
    # train on 100 of them, validate on the other 20, and the table plays the 30 held-out ones.
    "scienceworld": Recipe(suite="scienceworld",
                           games=(("find-non-living-thing", "scienceworld:find-non-living-thing:simplifications=easy",
                                   1500, 1e-3),),
                           expert_episodes=100, student_episodes=60, tokenizer_episodes=10, max_turns=15,
                           eval_episodes=30, eval_batch=10, val_episodes=20, val_split="train", val_first_seed=100,
                           expert_attempts=1),
}
FULL = SUITES["twx"]
# The suites whose models ship in common/tiny_models (what `--rebuild` makes by default). ScienceWorld's is made on
# request (`python -m common.tiny --rebuild --suite scienceworld --out DIR`, then AGENT_DISTILL_TINY=DIR): its
# expert is weak (0.30 held-out, a demonstration that the pipeline runs there, not a teacher), and its build is
# long and fragile (each env step about 0.1 s; its able student validates on 40 such episodes every 50 steps).
SHIPPED_SUITES = ("twx", "gem")


def smoke(r: Recipe) -> Recipe:
    """The seconds-long version of a recipe, for tests: same games and code path, small models trained
    briefly. The experts have learned the reply format and play valid, mostly wrong actions, so their
    episodes end at different turns (a failed game ends it) and a test's episodes are not all alike; the
    students have seen little (their replies are mostly invalid)."""
    expert_episodes = 8  # validation seeds of the train split come right after the training seeds
    return dataclasses.replace(
        r, expert=ModelShape(32, 1, 2, 1, 64), student=ModelShape(32, 1, 2, 1, 64), vocab_size=600,
        student_variants=tuple((v, shape and ModelShape(16, 1, 2, 1, 32)) for v, shape in r.student_variants),
        able_episodes=4, able_steps=20, able_val_every=10, able_val_episodes=2,
        games=tuple((g, spec, 150, 5e-3) for g, spec, _, _ in r.games), left_out=(), tokenizer_episodes=4,
        more_experts=tuple((name, spec, 150, 5e-3, init, 1) for name, spec, _, _, init, _ in r.more_experts),
        expert_episodes=expert_episodes, student_episodes=4, student_steps=100, eval_episodes=4, val_episodes=2,
        val_every=10**6, val_first_seed=r.val_first_seed if r.val_split != "train" else expert_episodes, max_turns=6,
        expert_attempts=1)  # validated once, at the end


SMOKE = smoke(FULL)


def recipe(suite: str = "twx") -> Recipe:
    """The recipe of a suite: the full one, or its smoke version when AGENT_DISTILL_TINY=smoke."""
    if suite not in SUITES:
        raise ValueError(f"unknown tiny suite {suite!r}; the suites are: {', '.join(SUITES)}")
    return smoke(SUITES[suite]) if os.environ.get("AGENT_DISTILL_TINY", "") == "smoke" else SUITES[suite]


def cache_root() -> str:
    return os.environ.get("AGENT_DISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "agent-distill"))


def build_dir(r: Recipe | None = None) -> str:
    """The suite's folder, named by what determines its tokenizer; each model in it has a folder named by
    what determines that model, so a changed or added model rebuilds only itself."""
    r = r or recipe()
    return os.path.join(cache_root(), f"tiny-{r.suite}-{r.tokenizer_key()}")


def artefact_dir(r: Recipe, what: str) -> str:
    """Folder of `tokenizer`, `expert-<game>` or `student[-<variant>]` in the suite's build folder."""
    if what == "tokenizer":
        return os.path.join(build_dir(r), "tokenizer")
    if what.startswith("expert-"):
        return os.path.join(build_dir(r), f"{what}-{r.expert_key(what[len('expert-'):])}")
    variant = what[len("student-"):] if what.startswith("student-") else ""
    return os.path.join(build_dir(r), f"{what}-{r.student_key(variant)}")


def catalog() -> dict:
    """The suites' models in the form of a shipped manifest, without files (common/tiny.py resolves names with
    it under `AGENT_DISTILL_TINY=smoke`, and `model_path` builds what a name selects)."""
    out = {"suites": {}, "models": {}}
    for suite in SUITES:
        r = recipe(suite)
        out["suites"][suite] = _suite_info(r)
        out["models"].update({name: {"suite": suite, "artefact": what} for name, what in names(r)})
    return out


def _suite_info(r: Recipe) -> dict:
    return {"games": {g: spec for g, spec, _, _ in r.games}, "heldout_episodes": r.eval_episodes,
            "max_turns": r.max_turns, "eval_batch": r.eval_batch}


def names(r: Recipe) -> list[tuple[str, str]]:
    """(name, artefact) of everything a suite builds: `tokenizer`, the students `tiny[-<variant>]` and the experts
    `tiny-expert:<name>` (with `:<suite>` after the first two outside the default suite)."""
    suffix = "" if r.suite == "twx" else f":{r.suite}"
    return ([("tokenizer" + suffix, "tokenizer"), ("tiny" + suffix, "student")]
            + [(f"tiny-{v}{suffix}", f"student-{v}") for v, _ in r.student_variants]
            + [(f"tiny-expert:{e[0]}", f"expert-{e[0]}") for e in r.experts()])


def model_path(entry: dict) -> str:
    """The built folder of a catalog entry (common/tiny.py), building it (and what it starts from) if missing."""
    return _ensure(recipe(entry["suite"]), entry["artefact"])


def prepare(entries: list[dict]) -> None:
    """Build what is missing of these catalog entries at once (a run's student and teachers): independent models
    build side by side in worker processes, one per core, instead of one after the other on first use."""
    for suite in dict.fromkeys(e["suite"] for e in entries):
        build(recipe(suite), only=list(dict.fromkeys(e["artefact"] for e in entries if e["suite"] == suite)),
              table=False)


# --------------------------------------------------------------------------------------------------
# Trajectories as text: (system prompt, observations, actions)
# --------------------------------------------------------------------------------------------------
@dataclass
class TextTrajectory:
    system: str
    observations: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    success: bool = False


def play(spec: str, seeds, policy: str, max_turns: int, rng: random.Random, split: str = "train",
         actions: list[str] | None = None):
    """Play one episode per seed with `policy`: "oracle", or "random" (a uniform choice among the valid
    actions where the env lists them, else among `actions`)."""
    env = envs.make(spec, split=split)
    out = []
    try:
        for seed in seeds:
            obs, info = env.reset(seed)
            traj = TextTrajectory(env.system_prompt(), [obs])
            for _ in range(max_turns):
                if policy == "oracle":
                    plan = env.oracle_actions()
                    if not plan:
                        break
                    action = plan[0]
                else:
                    choices = info.get("valid_actions") or actions
                    if not choices:
                        raise ValueError(f"{spec} lists no valid actions: random play needs a list of actions")
                    action = rng.choice(choices)
                obs, _, done, info = env.step(f"<action>{action}</action>")
                traj.actions.append(action)
                if done:
                    break
                traj.observations.append(obs)
            traj.success = bool(info["success"])
            out.append(traj)
    finally:
        env.close()
    return out


def action_pool(trajectories) -> list[str]:
    """The actions an oracle took: what a random policy picks from where the env lists no valid actions."""
    return sorted({a for t in trajectories for a in t.actions})


def reply_text(action: str) -> str:
    return f"<action>{action}</action>"


def render(tokenizer, traj: TextTrajectory) -> Episode:
    """A text trajectory in the scripts' token format (common/episode.py), agent turns trained."""
    eot = end_of_turn_id(tokenizer)
    ep = Episode.start(tokenizer, traj.system, traj.observations[0])
    for k, action in enumerate(traj.actions):
        ep.append_reply(tokenizer.encode(reply_text(action), add_special_tokens=False) + [eot], STUDENT, eot)
        if k + 1 < len(traj.observations):
            ep.append_observation(tokenizer, traj.observations[k + 1])
    return ep


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def train_bpe(words: Counter, vocab_size: int, alphabet) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-pair encoding, deterministically: merge the most frequent adjacent pair, ties broken by the
    pair itself (the `tokenizers` trainer breaks ties by hash order, so its merges change run to run).
    Returns the vocabulary (alphabet, then one token per merge) and the merges in order."""
    vocab = sorted(set(alphabet) | {c for w in words for c in w})
    merges = []
    split = {w: list(w) for w in words}  # each word as its current symbols
    pairs, where = Counter(), {}  # pair -> count, pair -> words containing it
    for w, n in words.items():
        for a, b in zip(split[w], split[w][1:]):
            pairs[a, b] += n
            where.setdefault((a, b), set()).add(w)
    while len(vocab) < vocab_size and pairs:
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        vocab.append(merged)
        merges.append(best)
        for w in sorted(where.pop(best, ())):
            sym, n = split[w], words[w]
            for a, b in zip(sym, sym[1:]):  # forget the word's old pairs
                pairs[a, b] -= n
                if pairs[a, b] <= 0:
                    del pairs[a, b]
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            split[w] = out
            for a, b in zip(out, out[1:]):  # and count its new ones
                pairs[a, b] += n
                where.setdefault((a, b), set()).add(w)
    return vocab, merges


def build_tokenizer(r: Recipe, path: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(r.seed)
    texts = []
    for spec in [g[1] for g in r.games] + [g[1] for g in r.left_out]:
        # twc's gold path is not reproducible (TextWorld-Express gives other rooms on a replay of the same
        # seed), so its text comes from random play only: the tokenizer must be the same on every build
        oracle = play(spec, range(r.tokenizer_episodes), "oracle", 15, rng) if not spec.startswith("twx:twc") else []
        pool = action_pool(oracle)
        for traj in oracle + play(spec, range(r.tokenizer_episodes), "random", 15, rng, actions=pool):
            texts.append(traj.system)
            texts += traj.observations
            texts += [reply_text(a) for a in traj.actions]
    texts += [envs.base.INVALID_FEEDBACK] + ["system\nuser\nassistant\n"] * 50
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(w for text in texts for w, _ in pre.pre_tokenize_str(text))
    vocab, merges = train_bpe(words, r.vocab_size - len(SPECIAL_TOKENS), pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + vocab)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=False) for t in ADDED_TOKENS])  # kept by decode(skip_special_tokens)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


# --------------------------------------------------------------------------------------------------
# Models: supervised training on rendered trajectories, and held-out evaluation
# --------------------------------------------------------------------------------------------------
def new_model(shape: ModelShape, vocab: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         head_dim=shape.hidden // shape.heads, intermediate_size=shape.mlp,
                         max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return Qwen3ForCausalLM(config)


def batches_by_tokens(episodes: list[Episode], batch_tokens: int, rng: random.Random):
    """Endless shuffled batches of whole episodes, about `batch_tokens` (padded) tokens each."""
    if not episodes:
        raise ValueError("no episodes to train on")
    lengths = [len(e) for e in episodes]
    while True:
        order = list(range(len(episodes)))
        rng.shuffle(order)
        for group in pack_by_tokens(lengths, batch_tokens, order):
            yield [episodes[i] for i in group]


def _sft_step(model, opt, episodes: list[Episode], pad_id: int) -> torch.Tensor:
    """One optimizer step of cross-entropy on the agent tokens of a batch of episodes (clipped at norm 1)."""
    b = collate(episodes, pad_id)
    hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    target, mask = b["input_ids"][:, 1:], b["loss_mask"][:, 1:]
    # the LM head only where the agent wrote: observations are most of the tokens and are not trained
    loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][mask]), target[mask])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def train_able(model, episodes: dict[str, list[Episode]], validate, r: Recipe, pad_id: int, seed: int, log) -> dict:
    """Make a novice able: supervised steps on each game's oracle episodes, round-robin over the games still in
    the mix (one game a batch), AdamW at `able_lr` after a short warmup. Every `able_val_every` steps every
    game is validated (`validate(model)` -> {game: success rate}): a game at `able_target` or above is out of
    the mix, one below it (again) is in; training stops when all are at the target together. So each game
    stops near the weak-but-able level instead of at the ceiling (its skill comes as a jump: a fixed step
    count lands before or far past it). Returns {game: (validation success, steps it trained)}."""
    from tqdm import tqdm

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=r.able_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    batches = {g: batches_by_tokens(eps, r.batch_tokens, rng) for g, eps in episodes.items()}
    active, reached, trained = list(episodes), {}, dict.fromkeys(episodes, 0)
    model.train()
    bar = tqdm(range(r.able_steps), desc="able student", file=sys.stderr, leave=False, mininterval=2.0, disable=_QUIET_BARS)
    for step in bar:
        game = active[step % len(active)]
        loss = _sft_step(model, opt, next(batches[game]), pad_id)
        sched.step()
        trained[game] += 1
        if (step + 1) % r.able_val_every == 0 or step + 1 == r.able_steps:
            # every game is validated, not only those in the mix: training on the others can make a game that
            # left forget (coin fell from 0.33 to 0.00 that way), and then it comes back into the mix
            model.eval()
            rates = validate(model)
            reached = {g: (rates[g], trained[g]) for g in episodes}
            active = [g for g in episodes if reached[g][0] < r.able_target]
            model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", val=" ".join(f"{g}={v:.2f}" for g, (v, _) in reached.items()))
            log(f"[tiny] able student, step {step + 1}: validation " + ", ".join(
                f"{g} {v:.2f}{'' if g in active else ' (out of the mix)'}" for g, (v, _) in reached.items()))
            if not active:
                break
    model.eval()
    return reached


def train_sft(model, episodes: list[Episode], steps: int, lr: float, r: Recipe, pad_id: int, desc: str, seed: int,
              validate=None):
    """Cross-entropy on the agent tokens (loss_mask), AdamW, short warmup then cosine decay.
    With `validate` (model -> success rate), keep the best weights seen after the first quarter of
    training, validating every `r.val_every` steps and at the end, and stop early after two perfect scores
    in a row.
    Returns (model, best validation success or None)."""
    import copy

    from tqdm import tqdm

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    it = batches_by_tokens(episodes, r.batch_tokens, rng)
    bar = tqdm(range(steps), desc=desc, file=sys.stderr, leave=False, mininterval=2.0, disable=_QUIET_BARS)
    best = None  # (validation success, step, weights)
    perfect = 0  # perfect validations in a row
    for step in bar:
        loss = _sft_step(model, opt, next(it), pad_id)
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        if validate and done >= steps // 4 and (done % r.val_every == 0 or done == steps):
            model.eval()
            score = validate(model)
            model.train()
            if best is None or score >= best[0]:  # on a tie the later weights, which trained longer
                best = (score, done, copy.deepcopy(model.state_dict()))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{score:.2f}", best=f"{best[0]:.2f}@{best[1]}")
            perfect = perfect + 1 if score >= 1.0 else 0
            if perfect == 2:  # the first perfect score can come right at the jump, before it is solid
                break
    if best is not None:
        model.load_state_dict(best[2])
    model.eval()
    return model, (best[0] if best is not None else None)


_POOLS: dict = {}


def env_pool(spec: str, split: str, n: int) -> list:
    """`n` environments of one spec, kept open between calls: a TextWorld-Express or ScienceWorld env is
    a Java process that takes a second to start and a few more to warm up, which cost more than the
    episodes of a 40-seed validation."""
    pool = _POOLS.setdefault((spec, split), [])
    while len(pool) < n:
        pool.append(envs.make(spec, split=split))
    return pool[:n]


def close_env_pools() -> None:
    """Close this process's env pools (at the end of each model's build)."""
    for pool in _POOLS.values():
        for env in pool:
            env.close()
    _POOLS.clear()


def close_pools() -> None:
    """Stop this process's evaluation helper (with its env pools) and close its own env pools (at the end of
    `build`)."""
    for helper in _HELPERS.values():
        helper.stop()
    _HELPERS.clear()
    close_env_pools()


@torch.no_grad()
def _play(model, tokenizer, spec: str, seeds: list[int], split: str, max_turns: int, max_new_tokens: int,
          cache: bool) -> list[Episode]:
    """Greedy rollouts of `seeds` as one batch, one env each (key/value caches kept across turns)."""
    eot = end_of_turn_id(tokenizer)
    pool = env_pool(spec, split, len(seeds))
    eps, caches = [], [TurnCache() for _ in seeds]
    for env, seed in zip(pool, seeds):
        obs, info = env.reset(seed)
        eps.append(Episode.start(tokenizer, env.system_prompt(), obs))
    active = list(range(len(seeds)))
    for _ in range(max_turns):
        if not active:
            break
        replies = generate_replies(model, tokenizer, [eps[i].ids for i in active], max_new_tokens, 0.0,
                                   caches=[caches[i] for i in active] if cache else None)
        still = []
        for i, ids in zip(active, replies):
            eps[i].append_reply(ids, STUDENT, eot)
            obs, _, done, info = pool[i].step(tokenizer.decode(ids, skip_special_tokens=True))
            eps[i].success, eps[i].score = info["success"], info["score"]
            if not done:
                eps[i].append_observation(tokenizer, obs)
                still.append(i)
        active = still
    return eps


class _Helper:
    """A worker process that plays evaluation batches for this one (`_play_batches`), with its own env pools,
    started at the first evaluation of more than one batch and stopped at the end of `build` (`close_pools`).
    Validation is most of a model's build (the able student's 15 validations of 3 x 40 episodes: about 100 of
    its 157 s) and its batches are independent; on a first run the expert's build ends long before the
    student's, and its core then plays half of each validation. The helper gets the model's weights with each
    request and plays with the caller's thread count, so its episodes are those this process would play (one
    thread: the build's weights depend on its validations)."""

    def __init__(self, tokenizer_path: str):
        import multiprocessing

        self.conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=_helper_main, args=(child, tokenizer_path),
                                                                    daemon=True)
        self.process.start()
        child.close()

    def send(self, model, batches: list[tuple], play_args: tuple) -> None:
        weights = io.BytesIO()
        torch.save(model.state_dict(), weights)
        self.conn.send((model.config, weights.getvalue(), torch.get_num_threads(), batches, play_args))

    def receive(self) -> list[list[Episode]]:
        try:
            out = self.conn.recv()
        except EOFError:
            raise RuntimeError("the tiny build's evaluation helper process died (see its error above)") from None
        if isinstance(out, BaseException):
            raise out
        return out

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def _helper_main(conn, tokenizer_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(tokenizer_path), None
    try:
        while (request := conn.recv()) is not None:
            config, weights, threads, batches, play_args = request
            try:
                if model is None or model.config.to_dict() != config.to_dict():
                    model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
                model.load_state_dict(torch.load(io.BytesIO(weights)))
                model.eval()
                with _threads(threads):
                    conn.send([_play(model, tokenizer, spec, seeds, *play_args) for spec, seeds in batches])
            except Exception as e:  # back to the caller, which raises it (as a picklable error)
                conn.send(RuntimeError(f"in the tiny build's evaluation helper: {type(e).__name__}: {e}"))
    except (EOFError, KeyboardInterrupt):  # the caller is gone
        pass
    finally:
        close_pools()


_HELPERS: dict[str, _Helper] = {}  # tokenizer path -> this process's helper
HELPERS = True  # False: every evaluation batch in the calling process (the same episodes, one core)


def _play_batches(model, tokenizer, batches: list[tuple[str, list[int]]], *play_args) -> list[list[Episode]]:
    """`_play` on each (spec, seeds) batch. With several batches and more than one core, a helper process
    plays some of them (the largest first, each to the side with fewer seeds so far) while this one plays the
    rest: the same episodes as playing them all here, in about half the time when a core is free."""
    path = getattr(tokenizer, "name_or_path", "")
    if len(batches) < 2 or not HELPERS or (os.cpu_count() or 1) < 2 or not os.path.isdir(path):
        return [_play(model, tokenizer, spec, seeds, *play_args) for spec, seeds in batches]
    if path not in _HELPERS:
        _HELPERS[path] = _Helper(path)
    helper = _HELPERS[path]
    shares, load = ([], []), [0, 0]
    for k in sorted(range(len(batches)), key=lambda k: -len(batches[k][1])):
        side = load.index(min(load))
        shares[side].append(k)
        load[side] += len(batches[k][1])
    helper.send(model, [batches[k] for k in shares[1]], play_args)
    try:
        out = {k: _play(model, tokenizer, *batches[k], *play_args) for k in shares[0]}
        out.update(zip(shares[1], helper.receive()))
    except BaseException:  # its answer would be out of step with the next request: a new helper next time
        _HELPERS.pop(path).stop()
        raise
    return [out[k] for k in range(len(batches))]


def evaluate_games(model, tokenizer, specs: list[str], seeds, max_turns: int, split: str = "heldout", batch: int = 25,
                   max_new_tokens: int = 24, cache: bool = True) -> list[dict]:
    """Greedy rollouts of `seeds` on each env spec, `batch` episodes at a time; for each spec its success
    rate, score and mean turns, and which seeds succeeded (a string of 0s and 1s in the seeds' order)."""
    seeds = list(seeds)
    owner = [j for j in range(len(specs)) for _ in range(0, len(seeds), batch)]  # each batch's spec
    batches = [(spec, seeds[i:i + batch]) for spec in specs for i in range(0, len(seeds), batch)]
    played = _play_batches(model, tokenizer, batches, split, max_turns, max_new_tokens, cache)
    out = []
    for j in range(len(specs)):
        results = [e for k, eps in enumerate(played) if owner[k] == j for e in eps]
        n = len(results)
        out.append({"success_rate": sum(e.success for e in results) / n, "score": sum(e.score for e in results) / n,
                    "episode_turns": sum(e.turns for e in results) / n,
                    "successes": "".join("1" if e.success else "0" for e in results)})  # per seed, in order
    return out


def evaluate(model, tokenizer, spec: str, seeds, max_turns: int, split: str = "heldout", batch: int = 25,
             max_new_tokens: int = 24, cache: bool = True) -> dict:
    """`evaluate_games` on one env spec."""
    return evaluate_games(model, tokenizer, [spec], seeds, max_turns, split, batch, max_new_tokens, cache)[0]


# --------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------
def _save_atomic(model, tokenizer, path: str, extra: dict):
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "tiny.json"), "w") as f:
        json.dump(extra, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(path: str):
    """Held while one process builds `path`: another process (a test, a second run) that needs the same
    artefact waits for it instead of building it into the same temporary folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(verbose: bool):
    return (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)


def _tokenizer(r: Recipe, log):
    from transformers import AutoTokenizer

    path = artefact_dir(r, "tokenizer")
    with _lock(path):
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            log(f"[tiny] building the tokenizer in {build_dir(r)}")
            tmp = path + ".tmp"
            build_tokenizer(r, tmp)
            os.replace(tmp, path)
    return AutoTokenizer.from_pretrained(path)


def _ensure(r: Recipe, what: str) -> str:
    """The folder of one artefact, built first if missing (a same-origin expert starts from the student)."""
    build(r, only=[what], table=False)
    return artefact_dir(r, what)


def _build_expert(r: Recipe, k: int, tokenizer, log) -> None:
    """Supervised training on the oracle's successful episodes, keeping the weights that do best on the
    validation seeds, retrained from another initialisation while validation stays below the target
    (at most `attempts` times). A same-origin expert starts from the student's weights instead."""
    game, spec, steps, lr, init, attempts = r.experts()[k]
    t0 = time.time()
    trajs = play(spec, range(r.expert_episodes), "oracle", r.max_turns, random.Random(r.seed))
    # only successful expert episodes (all of them if none succeeded, as in the smoke recipe)
    episodes = [render(tokenizer, t) for t in trajs if t.success] or [render(tokenizer, t) for t in trajs]
    val_seeds = range(r.val_first_seed, r.val_first_seed + r.val_episodes)  # disjoint from the table's
    best = None  # (validation success, model): a failed attempt is retried from another initialisation
    for attempt in range(attempts):
        if init == "student":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(_ensure(r, "student"))
        else:
            model = new_model(r.expert, len(tokenizer), r.seed + 1 + k + 1000 * attempt)
        _, val = train_sft(model, episodes, steps, lr, r, tokenizer.pad_token_id, f"expert {game} (attempt {attempt + 1})",
                           r.seed + k + 1000 * attempt,
                           validate=lambda m: evaluate(m, tokenizer, spec, val_seeds, r.max_turns, r.val_split,
                                                     r.eval_batch)["success_rate"])
        log(f"[tiny] expert {game}, attempt {attempt + 1}: validation success {val:.2f}")
        if best is None or val > best[0]:
            best = (val, model)
        if val >= r.expert_target:
            break
    model = best[1]
    ev = evaluate(model, tokenizer, spec, range(r.eval_episodes), r.max_turns, batch=r.eval_batch)
    close_env_pools()
    _save_atomic(model, tokenizer, artefact_dir(r, f"expert-{game}"),
                 {"game": game, "env": spec, "init": init, "heldout": ev, "train_seconds": time.time() - t0})
    log(f"[tiny] expert {game}: held-out success {ev['success_rate']:.2f} ({time.time() - t0:.0f}s)")


def _build_able_student(r: Recipe, tokenizer, log) -> None:
    """The default student: the novice (`tiny-novice`) made weak but able by `train_able` on a slice of every
    game's successful oracle episodes."""
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(_ensure(r, "student-novice"))
    episodes, specs = {}, {}
    for game, spec, _, _ in r.games:
        trajs = play(spec, range(r.able_episodes), "oracle", r.max_turns, random.Random(r.seed + 200))
        episodes[game] = [render(tokenizer, t) for t in trajs if t.success] or [render(tokenizer, t) for t in trajs]
        specs[game] = spec
    val_seeds = range(r.val_first_seed, r.val_first_seed + r.able_val_episodes)

    def validate(m):  # every game at once: its batches are shared with the helper process
        rates = evaluate_games(m, tokenizer, list(specs.values()), val_seeds, r.max_turns, r.val_split, r.eval_batch)
        return {g: rate["success_rate"] for g, rate in zip(specs, rates)}

    reached = train_able(model, episodes, validate, r, tokenizer.pad_token_id, r.seed + 200, log)
    close_env_pools()
    _save_atomic(model, tokenizer, artefact_dir(r, "student"),
                 {"init": "student-novice", "validation": {g: {"success_rate": v, "steps": n} for g, (v, n) in reached.items()},
                  "train_seconds": time.time() - t0})
    log(f"[tiny] student tiny (able): trained ({time.time() - t0:.0f}s)")


def _build_student(r: Recipe, variant: str, tokenizer, log) -> None:
    """A novice: brief supervised training on a random policy's episodes of every game, the format, not the
    tasks. (Its held-out success, for the table, is measured when the table asks for it: a first run does
    not wait.)"""
    if not variant:
        return _build_able_student(r, tokenizer, log)
    t0 = time.time()
    rng = random.Random(r.seed + 100)
    episodes = []
    for game, spec, _, _ in r.games:  # the actions the oracle uses, for envs that list no valid actions
        pool = action_pool(play(spec, range(r.tokenizer_episodes), "oracle", r.max_turns, rng))
        episodes += [render(tokenizer, t)
                     for t in play(spec, range(r.student_episodes), "random", r.max_turns, rng, actions=pool)]
    model = new_model(r.student_shape(variant), len(tokenizer), r.seed + 100)
    name = f"tiny-{variant}"
    train_sft(model, episodes, r.student_steps, r.lr, r, tokenizer.pad_token_id, f"student {name}", r.seed + 100)
    _save_atomic(model, tokenizer, artefact_dir(r, f"student-{variant}"), {"train_seconds": time.time() - t0})
    log(f"[tiny] student {name}: trained ({time.time() - t0:.0f}s)")


def _heldout(r: Recipe, what: str, tokenizer) -> dict:
    """Held-out success of a built model ({game: rates}; a student on every game), measured once and kept
    in its folder's tiny.json."""
    path = artefact_dir(r, what)
    with open(os.path.join(path, "tiny.json")) as f:
        info = json.load(f)
    if "heldout" not in info:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path).eval()
        rates = evaluate_games(model, tokenizer, [spec for _, spec, _, _ in r.games], range(r.eval_episodes),
                               r.max_turns, batch=r.eval_batch)
        info["heldout"] = {game: rate for (game, _, _, _), rate in zip(r.games, rates)}
        close_env_pools()
        with open(os.path.join(path, "tiny.json"), "w") as f:
            json.dump(info, f, indent=1)
    return info["heldout"] if not what.startswith("expert-") else {what[len("expert-"):]: info["heldout"]}


def artefacts(r: Recipe, more: bool = False) -> list[str]:
    """What a suite builds: `expert-<game>` for each game, `student`, `student-<variant>`, and with `more`
    the more experts (`expert-<name>`)."""
    return ([f"expert-{e[0]}" for e in r.experts()[:len(r.games) if not more else None]]
            + ["student"] + [f"student-{v}" for v, _ in r.student_variants])


# The weights of a model depend on the number of threads that trained it (float sums in another order, and a
# skill that arrives as a jump lands at another step): the build uses one thread, so that every machine with
# the same torch gets the same models; independent models build in parallel processes instead.
BUILD_THREADS = 1
_QUIET_BARS = False  # set in build workers: bars of two processes on one terminal overwrite each other


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _built(r: Recipe, what: str) -> bool:
    return os.path.exists(os.path.join(artefact_dir(r, what), "config.json"))


def _build_worker(r: Recipe, what: str, verbose: bool, helpers: bool = True) -> None:
    """One artefact, in a worker process of `build` (with the caller's choice of evaluation helpers)."""
    global _QUIET_BARS, HELPERS
    _QUIET_BARS, HELPERS = True, helpers
    build(r, verbose=verbose, only=[what], table=False, jobs=1)


def _build_order(r: Recipe, what: str) -> int:
    """Longest chains first: the able student (novice, then supervised steps), experts from scratch, then what
    starts from the student (a same-origin expert waits for it)."""
    if what.startswith("expert-"):
        init = next(e[4] for e in r.experts() if f"expert-{e[0]}" == what)
        return 2 if init == "student" else 1
    return 0


def build(r: Recipe | None = None, verbose: bool = True, only: list[str] | None = None, table: bool = True,
          more: bool = False, jobs: int | None = None) -> dict:
    """Build what is missing of the recipe's tokenizer and models (all of `artefacts(r, more)`, or those named
    in `only`), the models side by side in up to `jobs` processes (default: one per core); with `table`, return
    their held-out success: {game: {"teacher": ..., "student": ..., "student-<variant>": ...}}."""
    r = r or recipe()
    log = _log(verbose)
    wanted = artefacts(r, more) if only is None else [w for w in only if w != "tokenizer"]
    unknown = set(wanted) - set(artefacts(r, more=True))
    if unknown:
        raise ValueError(f"the tiny suite {r.suite!r} builds no {sorted(unknown)}; it builds {artefacts(r, True)}")
    tokenizer = _tokenizer(r, log)
    missing = sorted((w for w in wanted if not _built(r, w)), key=lambda w: _build_order(r, w))
    jobs = min(len(missing), jobs or os.cpu_count() or 1)
    if jobs > 1:  # each worker builds one model with one thread (and waits on the lock of one it needs)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        log(f"[tiny] building {', '.join(missing)} in {jobs} processes")
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in [pool.submit(_build_worker, r, what, verbose, HELPERS) for what in missing]:
                done.result()
    try:
        with _threads(BUILD_THREADS):
            for what in wanted:
                with _lock(artefact_dir(r, what)):
                    if _built(r, what):
                        continue
                    if what.startswith("expert-"):
                        _build_expert(r, next(k for k, e in enumerate(r.experts()) if f"expert-{e[0]}" == what),
                                      tokenizer, log)
                    else:
                        _build_student(r, what[len("student-"):] if what.startswith("student-") else "", tokenizer, log)
            rows = {}
            for what in wanted if table else ():
                for game, ev in _heldout(r, what, tokenizer).items():
                    rows.setdefault(game, {})["teacher" if what.startswith("expert-") else what] = ev
    finally:
        close_pools()  # the evaluation helper served every model of this call
    return rows


# --------------------------------------------------------------------------------------------------
# Rebuilding and shipping (python -m common.tiny --rebuild [--ship])
# --------------------------------------------------------------------------------------------------
def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _export(r: Recipe, name: str, what: str, out: str) -> dict:
    """Copy one built artefact into `out/<suite>/<name>` and return its manifest entry: where it came from in
    the recipe (its cache path, which names its recipe's hash), its files' SHA-256 and the games of its held-out
    table."""
    from common.tiny import sha256

    src = artefact_dir(r, what)
    folder = f"{r.suite}/{name.removesuffix(':' + r.suite).replace(':', '-')}"  # tiny-expert:coin -> twx/tiny-expert-coin
    dst = os.path.join(out, folder)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    e = {"suite": r.suite, "artefact": what, "folder": folder, "recipe_key": os.path.relpath(src, cache_root()),
         "files": {f: sha256(os.path.join(dst, f)) for f in sorted(os.listdir(dst))}}
    if what.startswith("expert-"):  # the games whose held-out table `rebuild` plays: an expert's own, a student's all
        spec = next(x[1] for x in r.experts() if f"expert-{x[0]}" == what)
        e["heldout"] = {spec.split(":")[1]: {"env": spec}}
    elif what != "tokenizer":
        e["heldout"] = {g: {"env": spec} for g, spec, _, _ in r.games}
    return e


def recipe_key(r: Recipe, what: str) -> str:
    """What names an artefact in the recipe (its folder in the cache, relative to the cache): a manifest's
    `recipe_key` differs from it when the recipe changed after the models were shipped."""
    return os.path.relpath(artefact_dir(r, what), cache_root())


def check_shipped(m: dict) -> None:
    """Refuse a manifest whose models the recipe would no longer build as they are (a recipe changed after the
    models were shipped), with the command that re-makes them."""
    from common.tiny import REBUILD

    stale = [n for n, e in m["models"].items() if recipe_key(SUITES[e["suite"]], e["artefact"]) != e["recipe_key"]]
    if stale:
        raise ValueError(f"the recipe of {', '.join(stale)} changed after the tiny models were shipped: run `{REBUILD}` "
                         "and commit common/tiny_models")


def rebuild(out: str, suites: list[str] | None = None, cache: str | None = None) -> dict:
    """Build every model of the suites (the shipped ones by default) from the recipe, in the cache `cache` (default `out/build`;
    a second call finds what the first built), then export them into `out` in the shipped layout with their
    manifest (`out/manifest.json`), which it returns."""
    import platform

    import transformers

    old = os.environ.get("AGENT_DISTILL_CACHE")
    os.environ["AGENT_DISTILL_CACHE"] = os.path.abspath(cache or os.path.join(out, "build"))  # workers inherit it
    m = {"suites": {}, "models": {}}
    try:
        for suite in suites or SHIPPED_SUITES:
            r = recipe(suite)
            build(r, more=True, table=False)
            built = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": BUILD_THREADS,
                     "machine": platform.machine(), "cpu": _cpu_name()}
            m["suites"][suite] = {**_suite_info(r), "built": built}
            m["models"].update({name: _export(r, name, what, out) for name, what in names(r)})
    finally:
        if old is None:
            os.environ.pop("AGENT_DISTILL_CACHE")
        else:
            os.environ["AGENT_DISTILL_CACHE"] = old
    _write_json(os.path.join(out, "manifest.json"), m)
    # the held-out table, measured on the exported files as a test measures them again (with each seed's success)
    from common.tiny import measure

    for name, rates in measure(root=out).items():
        for game, rate in rates.items():
            m["models"][name]["heldout"][game].update(rate)
    _write_json(os.path.join(out, "manifest.json"), m)
    return m


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def ship(out: str, shipped: str) -> None:
    """Replace the shipped suites with those rebuilt in `out` (the other shipped suites stay), manifest included."""
    with open(os.path.join(out, "manifest.json")) as f:
        new = json.load(f)
    path = os.path.join(shipped, "manifest.json")
    old = {"suites": {}, "models": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    for suite in new["suites"]:
        shutil.rmtree(os.path.join(shipped, suite), ignore_errors=True)
        shutil.copytree(os.path.join(out, suite), os.path.join(shipped, suite))
    models = {n: e for n, e in old["models"].items() if e["suite"] not in new["suites"]}
    _write_json(path, {"suites": {**old["suites"], **new["suites"]}, "models": {**models, **new["models"]}})
