"""What every config section shares: unknown keys fail, and a stable fingerprint of the values."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise: fail at load time, naming the key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def fingerprint(self) -> str:
        """Stable short hash of this section's values (cache keys, run directories)."""
        return stable_hash(self.model_dump(mode="json"))



def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
