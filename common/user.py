"""The simulated customer of conversational environments (envs/tau2.py), played by a language model.

In tau^2-bench the customer is a chat model prompted with the task's scenario. The environment hands its
user the conversation from the customer's side, as chat messages (system: guidelines and scenario; "user":
the agent's messages; "assistant": the customer's own), and takes the next message back; the conversation
ends when that message holds a stop token (###STOP###, ...). `ModelUser` is such a user for any model
`load_model` accepts (an alias, a hub id, a local folder, a tiny model), or for a model already loaded:

    user = ModelUser("qwen3-8b", device="cuda")     # loads its own, frozen copy
    user = ModelUser(model, tokenizer)              # a model already in memory (not FSDP-sharded)
    env = envs.make("tau2:airline", split="train", user=user)
    reply = user([{"role": "system", "content": "..."}, {"role": "user", "content": "Hi! How can I help?"}])

Without a user the environment uses its `ScriptedUser` (envs/tau2.py), a stand-in without a model.

Distributed runs: each rank keeps its own whole copy of the user model on its local device, and generates
with `model.generate` outside any process group. A model sharded with FSDP needs every rank to run each
forward pass together, but the ranks' conversations ask their users different numbers of times, so a
sharded teacher cannot double as the user: pass its name instead, which loads an unsharded copy (the memory
of one more model per rank). Greedy by default, as tau^2-bench samples its user at temperature 0; with a
temperature, sampling draws from the user's own seeded generator, so the caller's random streams are
untouched and a run is reproducible.
"""

from __future__ import annotations

import json
import re
import zlib

import torch

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)


class ModelUser:
    """A chat model playing the customer: `user(messages) -> str`, one message per call.

    `model`: a name for `load_model` (loaded frozen on `device`, bf16 on GPU) or a loaded causal LM, with
    its `tokenizer` (a chat template is needed). `max_new_tokens` bounds a message; `temperature` 0 is
    greedy; `thinking` turns on Qwen3's thinking mode (the think block is removed from the message)."""

    def __init__(self, model, tokenizer=None, max_new_tokens: int = 256, temperature: float = 0.0,
                 thinking: bool = False, device: str | torch.device | None = None, seed: int = 0):
        if isinstance(model, str):
            from common.models import load_model

            model, tokenizer = load_model(model, device=device)
        elif tokenizer is None:
            raise ValueError("ModelUser needs the tokenizer of a model passed as an object: ModelUser(model, tokenizer)")
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in model.modules()):
            raise ValueError("the user model must not be sharded with FSDP (ranks ask their users different numbers "
                             "of times): pass its name to ModelUser to load an unsharded copy")
        if max_new_tokens < 1 or temperature < 0:
            raise ValueError(f"ModelUser needs max_new_tokens >= 1 and temperature >= 0, got {max_new_tokens} "
                             f"and {temperature}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.thinking = max_new_tokens, temperature, thinking
        self.seed = seed
        self.eot = tokenizer.convert_tokens_to_ids("<|im_end|>")

    @torch.no_grad()
    def __call__(self, messages: list[dict]) -> str:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=self.thinking,
                                                 return_dict=True)["input_ids"]
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        # plain temperature sampling: top_p 1 and top_k 0 override the model's own generation_config (Qwen3's
        # samples with top_p 0.95, top_k 20)
        sampling = dict(do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0) if self.temperature > 0 \
            else dict(do_sample=False)
        pad = self.tokenizer.pad_token_id
        # Sampling uses the global generator: fork it, and seed it from the seed and the conversation so far,
        # so the caller's stream is left as it was and a conversation gets the same reply whatever was played
        # before it (a reset seed replays its episode).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(zlib.crc32(json.dumps([self.seed, messages]).encode()))
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=self.max_new_tokens, eos_token_id=self.eot,
                                      pad_token_id=self.eot if pad is None else pad, **sampling)
        text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        return _THINK_RE.sub("", text).strip()


def env_user(user_model: str | None, env: str, device=None) -> dict:
    """The keyword arguments that give a script's environments their customer: {} (the env's own scripted
    user) without `user_model`, else {"user": ModelUser(user_model)}, one copy shared by the rank's envs.
    A one-line error (ValueError) for an env that talks to no customer."""
    if not user_model:
        return {}
    if not env.startswith("tau2:"):
        raise ValueError(f"--user-model is for conversational envs (tau2:airline, tau2:retail), not {env!r}: drop it")
    return {"user": ModelUser(user_model, device=device)}
