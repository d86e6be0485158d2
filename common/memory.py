"""The memory plan of a run: per-device bytes from the models' configs, the world size and the run's lengths and
batch, before any weight is loaded (docs/memory.md).

A run's memory is what it keeps for its whole life (the student's sharded weights, gradients and AdamW state, the
teachers' sharded weights) plus the largest of what one phase adds on top and frees again: a rollout (the
models that generate, gathered whole or one layer at a time, and their key/value caches), teacher scoring (one
micro-batch's forward, the LM head a chunk of positions at a time), a training micro-batch (its activations, with
or without activation checkpointing, and the loss head), the optimizer step, and on a CPU the final save. Each
term names the flag that shrinks it. `choose` fills the run's "auto" memory choices (activation checkpointing,
how rollouts gather the models, whether caches are kept between turns, how many episodes decode at once) with the
fastest setting that fits the device; a plan that cannot fit stops the run in one line naming its biggest term.

The coefficients are measured, not guessed: the activations a Qwen3 decoder layer saves for backward per token
(`ACTIVATION_BYTES`, counted with torch.autograd.graph.saved_tensors_hooks on Qwen3 shapes from 0.6B to 8B in
fp32 and bf16; exact to 1% for those shapes), and a CPU process's own footprint (`RUNTIME_CPU`).
`python benchmark/real_shapes.py` checks whole plans against measured peaks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

GiB = 2 ** 30
# bytes one decoder layer saves for backward per token, by compute dtype size: (per hidden, per MLP width, per
# query width, per key/value width); Qwen3 keeps its RMSNorms' inputs in fp32, hence the hidden coefficient
ACTIVATION_BYTES = {4: (30.0, 16.0, 16.0, 16.7), 2: (20.0, 8.0, 10.0, 10.3)}
# with activation checkpointing a layer keeps only its input (and the rotary tables): bytes per hidden per token
CHECKPOINTED_BYTES = {4: 10.0, 2: 6.0}
RUNTIME_CPU = int(0.5 * GiB)  # a rank's own footprint on a CPU: Python, torch, transformers, the tokenizer
GPU_RESERVE = int(2.5 * GiB)  # of a GPU's memory, kept free for the CUDA context, NCCL and fragmentation
LOSS_CHUNK = 1024  # positions of one LM-head chunk in common/teacher.token_logprobs
GATHER_MODES = ("whole", "student", "layers")  # rollouts: every model gathered whole / the student only / none


# ----------------------------------------------------------------------------------------------------
# Model shapes, from a config alone


@dataclass
class Shape:
    """What the plan needs of a model: parameter counts (all, one decoder layer, the rest: embeddings, final norm,
    LM head) and the widths that size activations and caches."""

    name: str
    params: int
    layer_params: int
    layers: int
    hidden: int
    mlp: int  # the MLP width a token passes through (a mixture of experts: its active experts' together)
    q_dim: int
    kv_dim: int
    vocab: int

    @property
    def root_params(self) -> int:
        return self.params - self.layers * self.layer_params

    def kv_bytes(self, b: int) -> int:
        """Key/value cache bytes per token."""
        return 2 * self.layers * self.kv_dim * b


def qwen3_config(name: str):
    """The published config of a Qwen3 alias (common/models.QWEN3_SHAPES, and qwen3-30b-a3b), without a download."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    from common.models import QWEN3_SHAPES

    common = dict(vocab_size=151936, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
    if name == "qwen3-30b-a3b":
        return Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                              intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                              tie_word_embeddings=False, **common)
    hidden, layers, heads, kv, mlp, tied = QWEN3_SHAPES[name]
    return Qwen3Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       intermediate_size=mlp, tie_word_embeddings=tied, **common)


def load_config(name: str):
    """A model's config: a Qwen3 alias's published one, or config.json of a local folder, a tiny model or the hub
    cache (offline). A one-line ModelError where none can be had without downloading weights."""
    from transformers import AutoConfig

    from common.models import ALIASES, ModelError, QWEN3_SHAPES, is_tiny, resolve

    if name in QWEN3_SHAPES or name == "qwen3-30b-a3b":
        return qwen3_config(name)
    alias = next((a for a, hub in ALIASES.items() if hub == name), None)
    path = resolve(name) if not is_tiny(name) else None
    if is_tiny(name):
        from common import tiny

        tiny.prepare([name])
        path = tiny.model_path(name)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        if alias is not None:
            return qwen3_config(alias)
        raise ModelError(f"no config of {name!r} on this machine to plan with: pass a local folder holding its "
                         "config.json, or download it first (huggingface-cli download NAME config.json)") from None


def shape_of(name: str) -> Shape:
    """The Shape of a model by name, counted on the meta device from its config (no weights, no memory)."""
    from transformers import AutoModelForCausalLM

    config = load_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    layer = model.model.layers[0]
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    experts = getattr(text, "num_experts", 0) or 0
    mlp = text.moe_intermediate_size * text.num_experts_per_tok if experts else text.intermediate_size
    return Shape(name=name, params=sum(p.numel() for p in model.parameters()),
                 layer_params=sum(p.numel() for p in layer.parameters()), layers=text.num_hidden_layers,
                 hidden=text.hidden_size, mlp=mlp, q_dim=heads * head_dim, kv_dim=text.num_key_value_heads * head_dim,
                 vocab=text.vocab_size)


# ----------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Run:
    """What a plan is made of: the models, who generates together in a rollout, and the run's sizes and choices."""

    student: Shape
    teachers: list[Shape]  # each distinct teacher once
    generate: list[list[Shape]]  # the groups of models that generate together in one rollout (each group in turn)
    episodes: int  # a rank's episodes in one rollout (--num-envs; an evaluation batch is never larger)
    max_seq_len: int
    max_new_tokens: int
    micro_batch_tokens: int
    topk: int = 0  # the teacher's top-k kept per scored token
    full: bool = False  # the exact losses: full-vocabulary rows of teacher and student at every trained position
    world: int = 1
    gpu: bool = False
    user: Shape | None = None  # the customer model of conversational envs (--user-model): a whole copy per rank
    # the memory choices (common/memory.choose fills the auto ones)
    activation_checkpointing: bool = False
    gather: str = "whole"
    cache_turns: bool = True
    chunk: int = 0  # episodes decoded at once (0: all)


@dataclass
class Plan:
    """Per-device bytes: `kept` for the run's whole life, and each phase's additions; peak = kept + the largest."""

    run: Run
    kept: list[tuple[str, int, str]] = field(default_factory=list)  # (what, bytes, the flag that shrinks it)
    phases: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)

    def phase_total(self, phase: str) -> int:
        return sum(b for _, b, _ in self.phases[phase])

    @property
    def kept_total(self) -> int:
        return sum(b for _, b, _ in self.kept)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.kept_total + self.phase_total(self.peak_phase)

    def biggest(self) -> tuple[str, int, str]:
        """The largest single term at the peak."""
        return max(self.kept + self.phases[self.peak_phase], key=lambda t: t[1])

    def line(self, budget: int | None = None) -> str:
        """One line: the peak, its phase, and the terms over 5% of it."""
        r = self.run
        terms = [(w, b) for w, b, _ in self.kept + self.phases[self.peak_phase] if b > 0.05 * self.peak]
        choices = (f"activation checkpointing {'on' if r.activation_checkpointing else 'off'}, rollouts gather "
                   f"{ {'whole': 'every model whole', 'student': 'the student whole, teachers by layer', 'layers': 'by layer'}[r.gather]}, "
                   f"caches {'kept between turns' if r.cache_turns else 'rebuilt each turn'}, "
                   f"{r.chunk or r.episodes} episode(s) decoded at once")
        fits = f" of {budget / GiB:.1f} GiB" if budget else ""
        return (f"memory plan per rank ({r.world} rank(s), {'GPU, bf16' if r.gpu else 'CPU, fp32'}): peak {self.peak / GiB:.2f} GiB"
                f"{fits} in {self.peak_phase} ({', '.join(f'{w} {b / GiB:.2f}' for w, b in terms)}); {choices}")


def _act_bytes(s: Shape, b: int) -> float:
    h, m, q, kv = ACTIVATION_BYTES[b]
    return h * s.hidden + m * s.mlp + q * s.q_dim + kv * s.kv_dim


def make_plan(r: Run) -> Plan:
    """The plan of run `r` (its choices as given)."""
    W, bc = r.world, (2 if r.gpu else 4)  # compute bytes: FSDP's bf16 parameters on a GPU, fp32 on a CPU
    bt = bc  # a frozen teacher is stored in bf16 on a GPU, fp32 on a CPU (common/models.load_model)
    s, S = r.student, r.max_seq_len
    T = max(r.micro_batch_tokens, S)  # a micro-batch holds at least one whole episode
    chunk = min(r.chunk or r.episodes, r.episodes)
    p = Plan(r)
    more_ranks = "more ranks (--nproc_per_node, nodes)"
    p.kept.append(("student weights, gradients and AdamW state (fp32, sharded)", 16 * s.params // W, more_ranks))
    for t in r.teachers:
        p.kept.append((f"{t.name} weights (sharded)", bt * t.params // W, more_ranks))
    if r.user is not None:
        p.kept.append(("customer model (--user-model, whole on every rank)", bt * r.user.params, "a smaller --user-model"))
    if not r.gpu:
        p.kept.append(("process runtime", RUNTIME_CPU, "fewer ranks per host"))

    # Rollouts: each group of models that generate together, in turn; the largest is the phase.
    best: list[tuple[str, int, str]] = []
    for group in r.generate:
        terms = []
        for m in group:
            whole = r.gather == "whole" or (r.gather == "student" and m is s)
            if whole:
                terms.append((f"{m.name} weights for decoding (--rollout-gather)", bc * m.params, "--rollout-gather layers"))
            else:
                terms.append((f"{m.name} weights for decoding (--rollout-gather)", bc * (2 * m.layer_params + m.root_params), ""))
            kept_tokens = r.episodes * S if r.cache_turns else 0
            terms.append((f"{m.name} key/value caches", m.kv_bytes(bc) * (kept_tokens + 2 * chunk * S),
                          "--rollout-chunk, --no-cache-turns, --num-envs or --max-seq-len"))
        big = max(group, key=lambda m: m.params)
        prefill = chunk * (S if not r.cache_turns else min(S, 2048 + r.max_new_tokens))
        terms.append(("prefill activations (one layer) and decoding logits",
                      int(prefill * (_act_bytes(big, bc) + 2 * bc * big.hidden) + chunk * big.vocab * (bc + 12)),
                      "--rollout-chunk"))
        if sum(b for _, b, _ in terms) > sum(b for _, b, _ in best):
            best = terms
    p.phases["rollout"] = best

    # Teacher scoring (no grad): one micro-batch through one layer at a time, the LM head a chunk at a time.
    big = max(r.teachers + [s], key=lambda m: m.params)  # the student scores its rollout-time log-probs too
    n = min(LOSS_CHUNK, T)
    p.phases["teacher scoring"] = [
        ("gathered layers and root", bc * (2 * big.layer_params + big.root_params), ""),
        ("one layer's activations", int(T * (_act_bytes(big, bc) + 2 * bc * big.hidden)), "--micro-batch-tokens"),
        ("LM head chunk", n * big.vocab * (bc + 8), ""),
    ]

    # Training: one micro-batch's forward and backward.
    per_layer = CHECKPOINTED_BYTES[bc] * s.hidden if r.activation_checkpointing else _act_bytes(s, bc)
    train = [
        ("student layers and root gathered, a layer's gradients", (2 * bc + 4) * s.layer_params + (bc + 4) * s.root_params, ""),
        ("activations (every layer's, or with checkpointing each layer's input and one layer's)",
         int(T * s.layers * per_layer + (T * _act_bytes(s, bc) if r.activation_checkpointing else 0)),
         "--activation-checkpointing, --micro-batch-tokens"),
        ("loss head (hidden states, one chunk's logits and gradients)", T * s.hidden * bc + n * s.vocab * (bc + 12), ""),
    ]
    if r.topk:
        train.append(("teacher top-k", T * r.topk * 16, "--topk"))
    if r.full:
        train.append(("full-vocabulary rows of both models", 3 * T * s.vocab * 4, "a top-k or sampled loss"))
    p.phases["training micro-batch"] = train
    p.phases["optimizer step"] = [("AdamW's multi-tensor temporaries", 4 * s.params // W, more_ranks)]
    if not r.gpu:  # the final save gathers the full student on rank 0 (a GPU run does that in host memory)
        p.phases["final save (rank 0)"] = [("full student state dict", 4 * s.params, "")]
    return p


def candidates(r: Run, fixed: dict) -> list[dict]:
    """The memory settings to try, fastest first: activation checkpointing on, then rollouts gather teachers and
    then the student by layer, then fewer episodes decode at once, then caches rebuilt each turn. `fixed` holds
    the choices the user set (not auto)."""
    out = []
    chunks = [r.episodes]
    while chunks[-1] > 1:
        chunks.append(math.ceil(chunks[-1] / 2))
    for cache in (True, False):
        for chunk in chunks:
            for gather in GATHER_MODES:
                for ckpt in (False, True):
                    c = {"activation_checkpointing": ckpt, "gather": gather, "cache_turns": cache, "chunk": chunk}
                    c.update(fixed)
                    if c not in out:
                        out.append(c)
    # fastest first, by a rough cost of each saving: checkpointing (a third more training compute) 1, gathering
    # teachers by layer 2 and every model 4 (communication on every decoded token), each halving of the episodes
    # decoded at once 3, caches rebuilt each turn 10 (a turn re-reads the whole episode)
    def cost(c):
        return (c["activation_checkpointing"] + 2 * GATHER_MODES.index(c["gather"])
                + 3 * math.log2(r.episodes / c["chunk"]) + 10 * (not c["cache_turns"]))
    return sorted(out, key=cost)


def choose(r: Run, fixed: dict, budget: int, tiny: bool) -> Plan:
    """Fill the run's auto memory choices: a tiny student keeps the fastest setting (the embedded default's
    numbers never depend on the machine); a real one takes the fastest that fits `budget`, or the smallest."""
    from dataclasses import replace

    options = candidates(r, fixed)
    if tiny:
        return make_plan(replace(r, **options[0]))
    plans = [make_plan(replace(r, **c)) for c in options]
    return next((p for p in plans if p.peak <= budget), min(plans, key=lambda p: p.peak))


def check(plan: Plan, budget: int) -> None:
    """A one-line error when the plan does not fit: its peak, the phase, the biggest term and what shrinks it."""
    if plan.peak <= budget:
        return
    what, size, flag = plan.biggest()
    raise SystemExit(f"error: the memory plan needs {plan.peak / GiB:.1f} GiB per rank in {plan.peak_phase} and a rank has "
                     f"{budget / GiB:.1f} GiB; the biggest term is {what} ({size / GiB:.1f} GiB): "
                     f"{flag or 'more ranks'} (python <script> ... --plan shows every term; --device-memory overrides the budget)")


def budget(spec: str, device: torch.device) -> tuple[int, bool]:
    """(bytes one rank may plan for, whether it is a GPU) from --device-memory: `auto` = this rank's GPU (less a
    reserve for the CUDA context) or, on a CPU, the memory available now shared by the host's ranks; `gpu:GIB` or
    `cpu:GIB` plans for a device of that size (a plan for another machine, with --plan)."""
    if spec != "auto":
        kind, _, size = spec.partition(":")
        try:
            gib = float(size)
        except ValueError:
            gib = -1
        if kind not in ("gpu", "cpu") or gib <= 0:
            raise SystemExit(f"error: --device-memory {spec!r}: use auto, gpu:<GiB> or cpu:<GiB> (e.g. gpu:80)")
        return int(gib * GiB) - (GPU_RESERVE if kind == "gpu" else 0), kind == "gpu"
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory - GPU_RESERVE, True
    available = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return int(0.95 * available) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), False


def peak_bytes(device: torch.device) -> int:
    """This rank's measured peak: the most GPU memory its tensors held, or on a CPU its peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def table(plans: dict[int, Plan], budget_bytes: int) -> str:
    """The plans for several world sizes side by side, GiB per rank: every term, the phases, the peak, the choices."""
    worlds = list(plans)
    rows: list[tuple[str, list[float]]] = []

    def add(label, values):
        rows.append((label, [v / GiB for v in values]))

    first = plans[worlds[0]]
    for i, (what, _, _) in enumerate(first.kept):
        add(what, [p.kept[i][1] for p in plans.values()])
    for phase in first.phases:
        add(f"{phase}:", [p.phase_total(phase) for p in plans.values()])
        for i, (what, _, _) in enumerate(first.phases[phase]):
            add(f"  {what}", [p.phases[phase][i][1] if i < len(p.phases[phase]) else 0 for p in plans.values()])
    width = max(len(label) for label, _ in rows) + 2
    head = "GiB per rank".ljust(width) + "".join(f"{f'{w} rank(s)':>12}" for w in worlds)
    lines = [head] + [label.ljust(width) + "".join(f"{v:12.2f}" for v in values) for label, values in rows]
    lines.append("peak".ljust(width) + "".join(f"{p.peak / GiB:12.2f}" for p in plans.values()))
    lines.append(f"fits {budget_bytes / GiB:.1f} GiB".ljust(width) + "".join(f"{'yes' if p.peak <= budget_bytes else 'no':>12}" for p in plans.values()))
    for label, key in (("activation checkpointing", "activation_checkpointing"), ("rollout gather", "gather"),
                       ("cache turns", "cache_turns"), ("rollout chunk", "chunk")):
        shown = [getattr(p.run, key) for p in plans.values()]
        lines.append(label.ljust(width) + "".join(f"{({True: 'on', False: 'off'}.get(v, v) if isinstance(v, bool) else v):>12}"
                                                  for v in shown))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# What every script does with it


def size(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"


def plan_run(args, world: int, device, student: str, teachers: list[str], generate: list[list[str]], topk: int = 0,
             full: bool = False) -> Plan:
    """The run's memory plan, before any weight is loaded: fill args' auto memory choices (activation_checkpointing
    left off, cache_turns left on, rollout_gather "auto", rollout_chunk 0) with the fastest that fits a rank's memory, print
    it in one line (rank 0), stop with a one-line error if it cannot fit; with --plan print the table for 1 to 8
    ranks and exit. `generate`: the groups of models that generate together, each a teacher's name or STUDENT (the
    student's role in common/episode.py: a teacher may be the very model the student starts from)."""
    import torch.distributed as dist
    from dataclasses import replace

    from common.episode import STUDENT
    from common.models import ModelError, is_tiny

    tiny = is_tiny(student)
    spec = args.device_memory
    if args.plan and spec == "auto" and device.type == "cpu" and not tiny:
        spec = "gpu:80"  # a real model's plan on a machine without a GPU: for the GPUs it will run on
    budget_bytes, gpu = budget(spec, device)
    distinct = list(dict.fromkeys(teachers))
    try:  # one Shape per role (a teacher may be the student's own model), named by role in the plan
        shapes = {student: replace(shape_of(student), name="student")}
        roles = {t: replace(shape_of(t), name="teacher" if len(distinct) == 1 else f"teacher {os.path.basename(t)}")
                 for t in distinct}
        user = shape_of(args.user_model) if getattr(args, "user_model", None) else None
    except (ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    r = Run(student=shapes[student], teachers=list(roles.values()),
            generate=[[shapes[student] if n == STUDENT else roles[n] for n in g] for g in generate],
            episodes=args.num_envs, max_seq_len=args.max_seq_len,
            max_new_tokens=args.max_new_tokens, micro_batch_tokens=args.micro_batch_tokens, topk=topk, full=full,
            world=world, gpu=gpu, user=user)
    fixed = {}  # what the user forced: checkpointing on, caches off (left as they are, the plan may change them)
    if args.activation_checkpointing:
        fixed["activation_checkpointing"] = True
    if not args.cache_turns:
        fixed["cache_turns"] = False
    if args.rollout_gather != "auto":
        fixed["gather"] = args.rollout_gather
    if args.rollout_chunk:
        fixed["chunk"] = min(args.rollout_chunk, args.num_envs)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if args.plan:
        plans = {w: choose(replace(r, world=w), fixed, budget_bytes, tiny) for w in sorted({1, 2, 4, 8, world})}
        if rank0:
            print(f"memory plan: student {student} ({size(r.student.params)} parameters), teacher"
                  + ("s " if len(roles) > 1 else " ") + ", ".join(f"{name} ({size(t.params)})" for name, t in roles.items())
                  + f"; {args.num_envs} episodes per rank of up to {args.max_seq_len} tokens, micro-batches of "
                  f"{args.micro_batch_tokens} tokens; {'GPUs (bf16)' if gpu else 'CPU (fp32)'} of "
                  f"{budget_bytes / GiB:.1f} GiB usable per rank" + (" (no GPU here: planned for 80 GiB GPUs; "
                  "--device-memory cpu:<GiB> plans a CPU)" if spec != args.device_memory else ""))
            print(table(plans, budget_bytes))
        raise SystemExit(0)
    plan = choose(r, fixed, budget_bytes, tiny)
    args.activation_checkpointing, args.cache_turns = plan.run.activation_checkpointing, plan.run.cache_turns
    args.rollout_gather, args.rollout_chunk = plan.run.gather, (plan.run.chunk if plan.run.chunk < args.num_envs else 0)
    if rank0:
        print(plan.line(budget_bytes), flush=True)
    check(plan, budget_bytes)
    return plan
