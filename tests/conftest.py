import os
import sys

# tests import their shared builders as `helpers`
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here: fail fast, never hang
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
