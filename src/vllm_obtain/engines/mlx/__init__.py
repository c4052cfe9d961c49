"""MLX through mlx-lm: Apple Silicon's unified memory and GPU (mlx[cpu] elsewhere).

engine.py batches requests with mlx-lm's BatchGenerator; json_grammar.py constrains output to
JSON with llguidance. mlx and mlx-lm are imported only when a model loads.
"""
