"""HTTP and OpenAI's shapes, and nothing else: protocol models (protocol.py) translated once
into core options at the edge, one router per endpoint family, errors in OpenAI's envelope,
keys, limits, request logs and metrics. Never imports engines, runtime or weights."""
