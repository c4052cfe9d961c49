"""Engine-neutral serving, on contract types only: the served models (registry.py), request
planning and validation (planning.py), chat templates, tools and the tool-call stream readers,
the text stream, and the generation plumbing that turns token chunks into client text."""
