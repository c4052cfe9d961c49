"""vllm-obtain: a private, OpenAI-compatible LLM endpoint on any machine."""

__version__ = "0.1.0"
