"""Root attributes for synthetic runs written straight through the writer (shared by the test modules)."""

from __future__ import annotations

from saestore import protocol
from saestore.writer import RunLayout


def synthetic_attrs(layout: RunLayout, config: dict, *, expected_l0: float = 4.0) -> protocol.RunAttrs:
    """RunAttrs of a synthetic run: one made-up JumpReLU SAE per (layer type, layer) of ``layout``."""
    sae = protocol.SAEInfo(release=None, sae_id=None, path="/nowhere", hook_name="blocks.1.hook_resid_post",
                           width=layout.n_features, expected_l0=expected_l0, architecture="jumprelu")
    return protocol.RunAttrs(
        protocol_version=protocol.PROTOCOL_VERSION, layout=protocol.LAYOUT, status="running",
        created_at="2026-01-01T00:00:00+00:00", finalized_at=None, config=config,
        config_hash=protocol.config_hash(config), model=str(config.get("model", "synthetic")), setting="baseline",
        prompt_template=None, use_error_term=False, storage=layout.storage,
        saes={lt: {str(layer): sae for layer in layout.layers} for lt in layout.layer_types})
