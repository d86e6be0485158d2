"""One episode = one token sequence (token in, token out; DESIGN.md section 3).

The first prompt (system + first observation) is rendered once with the tokenizer's chat template.
After that the sequence only grows: the agent's generated tokens are appended exactly as sampled
(ending with `<|im_end|>`), then the next observation as a user turn followed by the assistant header.
A chat is never re-rendered, so the tokens the teacher scores and the student trains on are exactly
the tokens the agent acted on.

`loss_mask` marks agent-generated tokens (the closing `<|im_end|>` included); `turn_id` maps each token
to its turn (-1 for prompt and environment tokens); `role` marks who wrote it (0 = environment/prompt,
1 = student, 2 = teacher) so that Guided-OPD can give teacher turns and student turns different losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

import envs
from common.dist import all_max

ENV, STUDENT, TEACHER = 0, 1, 2


def _template_ids(tokenizer, messages, thinking: bool, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        enable_thinking=thinking)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def first_prompt_ids(tokenizer, system: str, observation: str, thinking: bool = False) -> list[int]:
    """System prompt + first observation + assistant header, as the chat template renders them."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": observation}]
    return _template_ids(tokenizer, messages, thinking, True)


def observation_ids(tokenizer, observation: str, thinking: bool = False) -> list[int]:
    """The tokens that follow an agent turn's `<|im_end|>`: the newline that closes the turn, the
    observation as a user turn, and the next assistant header (with the empty think block Qwen3's
    template adds in non-thinking mode). Rendered by the template itself, so it works for any
    ChatML-style template without a default system prompt (Qwen3 and the tiny one)."""
    newline = tokenizer.encode("\n", add_special_tokens=False)
    return newline + _template_ids(tokenizer, [{"role": "user", "content": observation}], thinking, True)


def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


@dataclass
class Episode:
    """A growing token sequence with its per-token masks, plus what the environment reported."""

    ids: list[int]
    loss_mask: list[int]
    turn_id: list[int]
    role: list[int]
    turns: int = 0
    done: bool = False
    truncated: bool = False
    success: bool = False
    score: float = 0.0
    reward: float = 0.0
    invalid_turns: int = 0
    task: str = ""
    seed: int = 0
    slot: int = -1  # its place in the iteration's batch over every rank (set by the script): picks its mini-batch
    prompt_len: int = 0
    replies: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    error: str = ""  # why its env failed, in one line ("" while it has not): the episode is over, to be dropped

    @classmethod
    def start(cls, tokenizer, system: str, observation: str, thinking: bool = False, **kw) -> "Episode":
        ids = first_prompt_ids(tokenizer, system, observation, thinking)
        n = len(ids)
        return cls(ids=ids, loss_mask=[0] * n, turn_id=[-1] * n, role=[ENV] * n, prompt_len=n,
                   observations=[observation], **kw)

    def append_reply(self, ids: list[int], role: int, eot_id: int, trained: bool = True) -> None:
        """Append one agent turn exactly as generated. If generation stopped before `<|im_end|>`
        (max new tokens), the closing token is added but not trained (the agent did not write it)."""
        closed = len(ids) > 0 and ids[-1] == eot_id
        self.ids += ids
        self.loss_mask += [int(trained)] * len(ids)
        if not closed:
            self.ids.append(eot_id)
            self.loss_mask.append(0)
        n = len(ids) + (0 if closed else 1)
        self.turn_id += [self.turns] * n
        self.role += [role] * n
        self.turns += 1

    def append_observation(self, tokenizer, observation: str, thinking: bool = False) -> None:
        obs = observation_ids(tokenizer, observation, thinking)
        self.ids += obs
        self.loss_mask += [0] * len(obs)
        self.turn_id += [-1] * len(obs)
        self.role += [ENV] * len(obs)
        self.observations.append(observation)

    def __len__(self) -> int:
        return len(self.ids)


def start_episodes(tokenizer, pool: list, seeds: list[int], thinking: bool = False,
                   tasks: list[str] | None = None) -> list[Episode]:
    """Reset env pool[i] to seeds[i] and start its episode (its task: tasks[i], else the env's), the envs at once
    where they allow it (`envs.call_all`). An env whose reset raises (its game process died, or any exception)
    gives a failed episode instead: empty, over, with its `error`; `Run.drop_failed` takes it out of the batch,
    and the env's next reset starts a new game process where the old one died."""
    starts = envs.call_all(pool, lambda env, seed: (*env.reset(seed), env.system_prompt()), seeds, errors=True)
    episodes = []
    for i, (env, seed, started) in enumerate(zip(pool, seeds, starts)):
        if isinstance(started, Exception):
            task = tasks[i] if tasks else getattr(env, "task", type(env).__name__)
            episodes.append(Episode(ids=[], loss_mask=[], turn_id=[], role=[], done=True, task=task, seed=seed,
                                    error=error_line(started, env)))
        else:
            obs, info, system = started
            episodes.append(Episode.start(tokenizer, system, obs, thinking, task=tasks[i] if tasks else info["task"], seed=seed))
    return episodes


def step_envs(pool: list, episodes: list[Episode], active: list[int], texts: list[str]) -> list[tuple]:
    """Step env pool[i] of each active episode i with its reply text (`envs.call_all`): (observation, reward,
    done, info) per active episode. An env whose step raises ends its episode: the episode's `error` is set and
    its step reads as a last, empty one (done, no reward, no success), so that the rollout closes it as any
    other; `Run.drop_failed` then takes it out of the batch."""
    steps = envs.call_all([pool[i] for i in active], lambda env, text: env.step(text), texts, errors=True)
    for i, step in zip(active, steps):
        if isinstance(step, Exception):
            episodes[i].error = error_line(step, pool[i])
    return [("", 0.0, True, {"success": False, "score": 0.0, "invalid": False}) if isinstance(step, Exception)
            else step for step in steps]


def error_line(error: Exception, env) -> str:
    """An env's exception in one line: an EnvError's message (without the env's name in front: the log
    line names it), else the exception's type and first line."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    prefix = f"{getattr(env, 'task', '')}: "
    text = text[len(prefix):] if text.startswith(prefix) else text
    if not (isinstance(error, envs.EnvError) and text):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text[:300]


def collate(episodes: list[Episode], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch tensors: input_ids, attention_mask, loss_mask, turn_id, role."""
    T = max(len(e) for e in episodes)
    B = len(episodes)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "loss_mask": torch.zeros((B, T), dtype=torch.bool),
        "turn_id": torch.full((B, T), -1, dtype=torch.long),
        "role": torch.zeros((B, T), dtype=torch.long),
    }
    for i, e in enumerate(episodes):
        n = len(e)
        out["input_ids"][i, :n] = torch.tensor(e.ids)
        out["attention_mask"][i, :n] = 1
        out["loss_mask"][i, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
        out["turn_id"][i, :n] = torch.tensor(e.turn_id)
        out["role"][i, :n] = torch.tensor(e.role)
    return out


def pack_by_tokens(lengths: list[int], budget: int, order: list[int] | None = None) -> list[list[int]]:
    """Group the indices of `lengths`, taken in `order` (default: as they come), so that each group's padded
    size (rows x longest row) stays within `budget` tokens; a row longer than the budget is a group of its
    own. Micro-batches of a training step (sorted by length: less padding), a teacher's scoring passes and
    the tiny build's shuffled batches all come from here."""
    groups, cur, longest = [], [], 0
    for i in (range(len(lengths)) if order is None else order):
        n = lengths[i]
        if cur and max(longest, n) * (len(cur) + 1) > budget:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups


def episode_sums(episodes: list[Episode]) -> dict[str, float]:
    """What training and evaluation log about episodes, as sums (so that ranks can add them up)."""
    return {"episodes": len(episodes), "success": sum(e.success for e in episodes),
            "score": sum(e.score for e in episodes), "turns": sum(e.turns for e in episodes),
            "invalid_turns": sum(e.invalid_turns for e in episodes), "truncated": sum(e.truncated for e in episodes),
            "agent_tokens": sum(sum(e.loss_mask) for e in episodes)}


def episode_means(sums: dict[str, float]) -> dict[str, float]:
    """The logged rates from `episode_sums` (added over ranks): per episode, or per turn for invalid actions."""
    n, turns = max(sums["episodes"], 1), max(sums["turns"], 1)
    return {"success_rate": sums["success"] / n, "score": sums["score"] / n, "episode_turns": sums["turns"] / n,
            "invalid_action_rate": sums["invalid_turns"] / turns, "truncated_rate": sums["truncated"] / n}


class TurnCache:
    """One model's key/value cache for one episode, kept between turns.

    An episode only grows (section 3), so the keys and values computed for its first `n` tokens stay
    valid for the rest of the episode: the next turn only has to run the tokens appended since (the
    last reply and the observation) instead of the whole prompt again. Without it every turn
    re-reads the whole conversation, which costs O(turns^2) and dominated rollout time on multi-turn
    episodes. Stored compact (no padding), one (keys, values) pair per layer, [1, kv_heads, n, head_dim].
    Use one per (model, episode): a teacher and a student that take turns on an episode each keep their
    own, and each catches up on the tokens the other wrote."""

    def __init__(self):
        self.n = 0  # how many tokens of the episode are in the cache
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []


def _batched_cache(model, caches: list[TurnCache], width: int):
    """The episodes' caches left-padded to `width` positions, as a transformers DynamicCache."""
    from transformers import DynamicCache

    past = DynamicCache(config=model.config)
    ref = next(c for c in caches if c.n)  # episodes seen for the first time have empty caches
    for layer in range(len(ref.layers)):
        keys, values = [], []
        for c in caches:
            k, v = c.layers[layer] if c.n else (ref.layers[layer][0][:, :, :0], ref.layers[layer][1][:, :, :0])
            pad = width - k.shape[2]
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        past.update(torch.cat(keys), torch.cat(values), layer)
    return past


class BatchCache:
    """One model's key/value cache for a whole rollout batch, kept between turns in buffers that are
    written in place: the fast path of `generate_replies` (for GPUs, where copying caches costs as much
    as the attention that reads them).

    `TurnCache` stores each episode compactly and rebuilds a padded batch cache every turn, and the
    decoding loop then concatenates one column per token onto every layer: each turn copies the whole
    cache several times. Here each episode owns one row of preallocated [episodes, kv_heads, columns,
    head_dim] buffers per layer; a turn writes its new tokens (prefill) and each decoded token into the
    next free columns, and attention reads the rows up to the last written column, with `real` masking
    the columns that hold no token of the row (left padding of the batched prefill, rows that did not
    write this turn, ended episodes). Every call runs the whole batch (rows without a reply to write
    are masked): on a GPU decoding is bound by reading weights and caches, not by rows. When the
    columns run out, rows are compacted (their real columns kept, right-aligned) into larger buffers.

    Used like a list of per-episode caches: `caches[i]` is episode i's slot, `caches[i] = None` frees
    it, and `generate_replies(..., caches=[caches[i] for i in writers])` takes the fast path."""

    def __init__(self, episodes: int, headroom: float = 1.5):
        self.rows = episodes
        self.n = [0] * episodes  # how many tokens of each episode its row holds (real[row].sum(), kept on the host)
        self.headroom = headroom  # buffers grow to this multiple of what the next turn needs
        self.col = 0  # columns written so far (shared by all rows)
        self.capacity = 0
        self.real: torch.Tensor | None = None  # [episodes, capacity] bool: the column holds a token of the row
        self.past = None  # a transformers Cache of _BufferLayer, one per decoder layer

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> "_Slot":
        return _Slot(self, i)

    def __setitem__(self, i: int, value) -> None:
        if value is not None:
            raise ValueError("a BatchCache row can only be freed (set to None)")
        self.n[i] = 0
        if self.real is not None:
            self.real[i] = False  # its columns are dropped at the next compaction

    def reserve(self, model, columns: int, device) -> None:
        """Make room for `columns` more columns: compact the rows into new, larger buffers if needed."""
        if self.past is None:
            self.past = Cache(layers=[_BufferLayer(self) for _ in range(model.config.num_hidden_layers)])
        if self.col + columns <= self.capacity:
            return
        counts = self.real.sum(1) if self.real is not None else torch.zeros(self.rows, dtype=torch.long, device=device)
        width = int(counts.max()) if self.rows else 0
        capacity = int((width + columns) * self.headroom) + 1
        real = torch.zeros((self.rows, capacity), dtype=torch.bool, device=device)
        real[:, :width] = torch.arange(width, device=device)[None, :] >= (width - counts)[:, None]
        if width:  # row r's real columns, in order, land at [width - count_r, width)
            order = torch.sort(self.real[:, :self.col].long(), dim=1, stable=True).indices[:, -width:]
            for layer in self.past.layers:
                layer.move(order, capacity)
        else:
            for layer in self.past.layers:  # nothing to keep: new buffers at the next forward pass
                layer.keys = layer.values = None
                layer.is_initialized = False
        self.real, self.col, self.capacity = real, width, capacity


class _Slot:
    """Episode `row`'s place in a BatchCache (what `BatchCache[row]` returns)."""

    def __init__(self, batch: BatchCache, row: int):
        self.batch, self.row = batch, row

    @property
    def n(self) -> int:
        return self.batch.n[self.row]


class _BufferLayer(DynamicLayer):
    """One decoder layer's keys and values of a BatchCache: a preallocated buffer written in place
    (the step's new columns), returned as a view up to the last written column (no concatenation)."""

    def __init__(self, owner: BatchCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = torch.zeros((b, h, self.owner.capacity, d), dtype=self.dtype, device=self.device)
        self.values = torch.zeros((b, h, self.owner.capacity, value_states.shape[-1]), dtype=self.dtype,
                                  device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.owner.col  # the owner moves its column after the whole forward pass
        end = start + key_states.shape[2]
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.owner.col

    def move(self, order: torch.Tensor, capacity: int) -> None:
        """Gather each row's columns `order[row]` into the first columns of new buffers of `capacity`."""
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            b, h, _, d = old.shape
            new = old.new_zeros((b, h, capacity, d))
            idx = order[:, None, :, None].expand(b, h, order.shape[1], d)
            new[:, :, :order.shape[1]] = old.gather(2, idx)
            setattr(self, name, new)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """The next token of each row from its last logits: greedy at temperature 0, else sampled (nucleus
    with top_p < 1), on the logits' device. `generator`: one for every row, or groups [(rows, generator)]:
    each group's rows sampled together with its own generator, as a batch of only those rows would be."""
    if isinstance(generator, list):
        nxt = torch.empty(len(logits), dtype=torch.long, device=logits.device)
        for rows, gen in generator:
            nxt[rows] = _sample(logits[rows], temperature, top_p, gen)
        return nxt
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _generate_in_place(model, tokenizer, prompts: list[list[int]], slots: list[_Slot], max_new_tokens: int,
                       temperature: float, top_p: float, generator, check_every: int) -> list[list[int]]:
    """`generate_replies` on a BatchCache: the whole batch runs, the rows of `slots` write replies."""
    cache = slots[0].batch
    if any(s.batch is not cache for s in slots):
        raise ValueError("the slots of one generate_replies call must come from one BatchCache")
    device = next(model.parameters()).device
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    rows = [s.row for s in slots]
    new = []
    for p, r in zip(prompts, rows):
        if cache.n[r] >= len(p):
            raise ValueError(f"a prompt of {len(p)} tokens does not extend its cache of {cache.n[r]} tokens")
        new.append(p[cache.n[r]:])
    S = max(len(x) for x in new)
    cache.reserve(model, S + max_new_tokens, device)
    B, C = cache.rows, cache.col
    ids = torch.full((B, S), pad, dtype=torch.long)
    positions = torch.zeros((B, S), dtype=torch.long)
    written = torch.zeros((B, S), dtype=torch.bool)
    for r, x in zip(rows, new):
        ids[r, S - len(x):] = torch.tensor(x)
        positions[r, S - len(x):] = torch.arange(cache.n[r], cache.n[r] + len(x))
        written[r, S - len(x):] = True
    cache.real[:, C:C + S] = written.to(device)
    next_pos = torch.zeros(B, dtype=torch.long)
    next_pos[rows] = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    writing = torch.zeros(B, dtype=torch.bool)
    writing[rows] = True
    step_ids, step_pos, next_pos = ids.to(device), positions.to(device), next_pos.to(device)
    finished = ~writing.to(device)  # rows without a reply to write are finished from the start
    out_tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=cache.real[:, :cache.col + step_ids.shape[1]],
                    position_ids=step_pos, past_key_values=cache.past, use_cache=True, logits_to_keep=1)
        cache.col += step_ids.shape[1]
        nxt = torch.where(finished, pad, _sample(out.logits[:, -1, :], temperature, top_p, generator))
        out_tokens[:, t] = nxt
        in_reply = ~finished
        just_done = in_reply & (nxt == eot)
        lengths = torch.where(just_done, t + 1, lengths)
        finished = finished | just_done
        if t + 1 == max_new_tokens:
            break
        # the host looks at `finished` only every `check_every` tokens (each look waits for the device);
        # the steps run after every reply has ended only feed masked padding
        if (t + 1) % check_every == 0 and all_max(int(slots != [] and not bool(finished.all()))) == 0:
            break
        step_ids, step_pos = nxt[:, None], (next_pos + t)[:, None]
        cache.real[:, cache.col] = in_reply
    real_fed = cache.real[:, C:cache.col].sum(1).cpu()
    for r in rows:
        cache.n[r] += int(real_fed[r])
    out_tokens, lengths = out_tokens.cpu(), lengths.cpu()
    return [out_tokens[r, :lengths[r]].tolist() for r in rows]


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                     top_p: float = 1.0, generator: torch.Generator | None = None,
                     caches: list[TurnCache] | list[_Slot] | None = None, check_every: int = 1,
                     chunk: int = 0) -> list[list[int]]:
    """Sample one turn for each prompt (a list of token ids), batched with left padding.

    Returns each reply's new tokens up to and including the first `<|im_end|>` (or `max_new_tokens`
    tokens if it never came). temperature 0 = greedy. A small, explicit decoding loop with a plain
    key/value cache: on long multi-turn prompts it is several times faster here than `generate`'s
    default cache machinery, and every rank runs the same number of steps (FSDP needs that).

    With `caches` (one TurnCache per prompt, for this model), each prompt must extend the sequence its
    cache has seen; only the new tokens are run, and the caches are updated in place. Padding holes
    inside the batch are masked out and every real token gets its position in its own episode
    (explicit `position_ids`), so the result equals a run without caches up to float rounding.
    With slots of a `BatchCache` (`[batch[i] for i in rows]`), the fast path runs instead: same replies.

    `check_every`: how often (in tokens) the host checks whether every reply has ended; each check waits
    for the device (and, with several ranks, for the others), so on a GPU a few wasted steps are cheaper
    than a check per token. Every rank of a run must pass the same value.

    `generator` may be a list with one generator per prompt: the prompts that share one are a group, sampled
    together with it at every step, so that each group's replies are those of a call with only its prompts
    and that generator (without a BatchCache), up to float rounding; a group's generator may advance further
    (the steps after its replies ended). One batched call instead of one per group.

    `chunk`: decode at most this many prompts at once (0 = all), one call after another, so that the batched
    key/value cache and the logits of a call hold `chunk` episodes, not the whole batch (the memory plan's
    --rollout-chunk). Every rank runs as many calls (FSDP); a rank short of prompts joins with empty ones."""
    if model.training:  # generation runs the model in eval mode: with activation checkpointing on, transformers
        try:            # turns the cache off in training mode
            return generate_replies(model.eval(), tokenizer, prompts, max_new_tokens, temperature, top_p, generator,
                                    caches, check_every, chunk)
        finally:
            model.train()
    if chunk and not (caches and isinstance(caches[0], _Slot)):
        calls = all_max(-(-len(prompts) // chunk))
        if calls > 1:
            out = []
            for c in range(calls):
                part = slice(c * chunk, (c + 1) * chunk)
                out += generate_replies(model, tokenizer, prompts[part], max_new_tokens, temperature, top_p,
                                        generator[part] if isinstance(generator, list) else generator,
                                        caches[part] if caches is not None else None, check_every)
            return out
    if isinstance(generator, list):  # one per prompt: the rows of each distinct generator form a group
        rows = [s.row for s in caches] if caches and isinstance(caches[0], _Slot) else range(len(prompts))
        groups = {}
        for r, g in zip(rows, generator):
            groups.setdefault(id(g), (g, []))[1].append(r)
        generator = ([(torch.tensor(r), g) for g, r in groups.values()]  # (no prompt: the empty turn's own)
                     or [(torch.tensor([0]), torch.Generator(next(model.parameters()).device))])
    if caches and isinstance(caches[0], _Slot):
        return _generate_in_place(model, tokenizer, prompts, caches, max_new_tokens, temperature, top_p, generator,
                                  check_every)
    device = next(model.parameters()).device
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    n_real = len(prompts)
    if n_real == 0:  # this rank has nothing to generate but must join the other ranks' forward passes
        prompts, caches = [[eot]], None
    B = len(prompts)
    cached = [c.n for c in caches] if caches is not None else [0] * B
    for p, n in zip(prompts, cached):
        if n >= len(p):
            raise ValueError(f"a prompt of {len(p)} tokens does not extend its cache of {n} tokens")
    new = [p[n:] for p, n in zip(prompts, cached)]
    C, S = max(cached), max(len(x) for x in new)
    ids = torch.full((B, S), pad, dtype=torch.long)
    mask = torch.zeros((B, C + S), dtype=torch.long)
    positions = torch.zeros((B, S), dtype=torch.long)
    for i, (x, n) in enumerate(zip(new, cached)):
        ids[i, S - len(x):] = torch.tensor(x)
        mask[i, C - n:C] = 1
        mask[i, C + S - len(x):] = 1
        positions[i, S - len(x):] = torch.arange(n, n + len(x))
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    past = _batched_cache(model, caches, C) if C > 0 else None
    next_pos = torch.tensor([len(p) for p in prompts], device=device)  # each episode's next position
    out_tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    step_ids, step_pos = ids, positions
    for t in range(max_new_tokens):
        # logits_to_keep=1: only the last position's logits (a 151k vocab over a whole prompt is huge)
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                    use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        nxt = torch.where(finished, pad, _sample(out.logits[:, -1, :], temperature, top_p, generator))
        out_tokens[:, t] = nxt
        in_reply = ~finished  # this token belongs to the reply (the closing <|im_end|> included)
        just_done = (~finished) & (nxt == eot)
        lengths = torch.where(just_done, torch.full_like(lengths, t + 1), lengths)
        finished |= just_done
        if t + 1 == max_new_tokens:
            break
        # FSDP: every rank runs as many forward passes as the rank with the longest reply
        if (t + 1) % check_every == 0 and all_max(int(n_real > 0 and not bool(finished.all()))) == 0:
            break
        step_ids = nxt[:, None]
        step_pos = (next_pos + t)[:, None]
        # tokens after a reply's end are padding: masked, so they never enter an episode's cache
        mask = torch.cat([mask, in_reply.long()[:, None]], dim=1)
    if caches is not None:  # keep each episode's real tokens, without the batch's padding
        real = mask.bool()
        for i, c in enumerate(caches):
            keep = real[i].nonzero().squeeze(-1)
            c.layers = [(layer.keys[i:i + 1, :, keep], layer.values[i:i + 1, :, keep])
                        for layer in past.layers]
            c.n = int(keep.numel())
    out_tokens, lengths = out_tokens.cpu(), lengths.cpu()
    return [out_tokens[i, : lengths[i]].tolist() for i in range(n_real)]
