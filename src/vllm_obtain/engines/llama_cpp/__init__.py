"""llama.cpp through llama-cpp-python: GGUF models on CPU, CUDA, Metal or ROCm.

engine.py serves a chat/completion model with continuous batching (scheduler.py), each sequence
picking its tokens with its own sampler (sampling.py, grammar.py for JSON); embedder.py serves
an embedding model. llama-cpp-python itself is imported only when a model loads.
"""
