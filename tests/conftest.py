"""Test set-up: the repository on sys.path, and the tiny default in its seconds-long smoke recipe (untrained
models in the right shapes) in a cache of the test session's own, so tests never need the full build."""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["AGENT_DISTILL_TINY"] = "smoke"
os.environ.setdefault("AGENT_DISTILL_CACHE", os.path.join(tempfile.gettempdir(), "agent-distill-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
