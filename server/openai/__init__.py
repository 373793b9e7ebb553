"""The OpenAI-compatible surface (``/v1``): routes (``router``), pydantic models (``protocol``) and OpenAI semantics on
top of the pipeline (``serving``)."""
