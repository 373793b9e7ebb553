"""The admin REST API (``/admin/v1``): routes (``router``), pydantic models (``protocol``) and the logic between them
and the registry (``serving``)."""
