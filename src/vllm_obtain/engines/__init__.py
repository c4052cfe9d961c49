"""The inference backends, one subpackage each (llama_cpp/, vllm/, mlx/), and the registry that
names them (registry.py). Backends implement vllm_obtain.contract and import nothing else of
ours; none knows HTTP."""
