"""Where the SAE of each layer type reads the model: one table. A new layer type is a row here plus
its name in ``saestore.protocol.LayerType`` (the variable table's ``T`` rows then give it every
variable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saestore import protocol
from saestore.errors import ExtractionConfigError


@dataclass(frozen=True)
class Site:
    """The TransformerLens hook an SAE of a layer type reads, and how sae_lens reshapes it."""

    hook: str
    """hook name pattern, ``{layer}`` is the layer."""
    reshape: Literal["none", "hook_z"]
    """sae_lens ``reshape_activations``: ``hook_z`` flattens heads (d_in = n_heads * d_head)."""
    forward_order: int
    """order in which one block's forward pass reaches the hooks."""


SITES: dict[str, Site] = {
    "res": Site("blocks.{layer}.hook_resid_post", "none", 2),
    "mlp": Site("blocks.{layer}.hook_mlp_out", "none", 1),
    "att": Site("blocks.{layer}.attn.hook_z", "hook_z", 0),
}


def site(layer_type: str) -> Site:
    if layer_type not in SITES:
        raise ExtractionConfigError(
            f"unknown layer type {layer_type!r}: choose {', '.join(protocol.LAYER_TYPES)}")
    return SITES[layer_type]


def hook_name(layer_type: str, layer: int) -> str:
    """The hook an SAE of ``layer_type`` at ``layer`` reads."""
    return site(layer_type).hook.format(layer=layer)


def forward_hooks(n_layers: int, layer_types: tuple[str, ...] = protocol.LAYER_TYPES) -> list[str]:
    """Every SAE hook of ``layer_types`` in the order the forward pass reaches them."""
    ordered = sorted(layer_types, key=lambda lt: site(lt).forward_order)
    return [hook_name(lt, layer) for layer in range(n_layers) for lt in ordered]
