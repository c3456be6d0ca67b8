"""The torch.compile front end: read-only matchers over FX graphs (patterns/), one rewrite per file applied in
explicit ordered lists (passes/), and the driver that matches, runs the lists and falls back to the unchanged
graph with a reason (rewrite.py)."""
