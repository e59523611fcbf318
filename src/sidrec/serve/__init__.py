"""Online serving: `sidrec serve RUN` (HTTP JSON, micro-batched constrained decoding)."""

from sidrec.serve.app import Batching, Service, create_app, serve
from sidrec.serve.schemas import Limits

__all__ = ["Batching", "Limits", "Service", "create_app", "serve"]
