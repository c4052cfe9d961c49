"""Model names to weight files: the catalogue of aliases and where each engine finds them
(catalog.py, models.yaml), Hugging Face downloads, and the conversions engines need
(gguf_to_hf.py for vLLM and MLX, bert_to_gguf.py for the embedding model)."""
