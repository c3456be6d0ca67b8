"""The ONNX front end, for models exported without tokensparse: matchers over onnx-ir graphs (patterns/), the
rewrite passes in their explicit order (passes/), and rewrite_onnx, which matches, runs them and verifies the
result in ONNX Runtime (rewrite.py). `import onnx` inside this package is the onnx library (absolute imports)."""
