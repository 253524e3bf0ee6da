"""Names of the package's torch.library custom ops.

Installed, the ops live in the `spikelm` namespace (`torch.ops.spikelm.dsn_fused`). A saved model
folder loaded with trust_remote_code carries its own copy of this code, imported under another
module name: its ops get a namespace of their own, so the installed package and any number of
remote-code copies can be loaded in one process without registering an op twice.
"""
from __future__ import annotations

import hashlib

NAMESPACE = "spikelm" if __name__.startswith("spikelm.") else \
    "spikelm_" + hashlib.sha256(__name__.encode()).hexdigest()[:12]


def op_name(name: str) -> str:
    """The qualified name ("namespace::name") under which the op `name` is registered."""
    return f"{NAMESPACE}::{name}"
