"""Test set-up: the repository on sys.path, and the tiny default in its seconds-long smoke recipe (small
models trained briefly) in a cache of the tests' own, so tests never need the full build.

The cache folder is named by a hash of the code that builds the tiny models (common/ and envs/), not only
by the recipe: a change to that code rebuilds them, so a stale build can never pass the tests."""

import glob
import hashlib
import os
import sys
import tempfile

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
