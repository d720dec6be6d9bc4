"""LoRA adapters on the text decoder, in the Moondream variant convention: every block's qkv, proj, fc1
and fc2 get `y += (x @ A^T) @ B^T` with no scale (any alpha/rank is folded into B). qkv, fc1 and proj
read the block's post-LN input (proj too: the variant format adapts proj from the attention *input*);
fc2 reads the post-GELU activation.

Moondream 3's MoE layers adapt each expert instead (Kestrel/Photon's layout, so a Lens-trained adapter loads
unchanged): fc1 (up) A (E, r/k, dim) and B (E, 2·inner, r/k), fc2 (down) A (E, r/k, inner) and B (E, dim,
r/k), the total rank split across the k active experts; a token's delta comes from the experts it is
routed to, the down delta weighted by the router like the expert itself. Kestrel files name them
`…dense.{i}.up_a` … and `…moe.{j}.down_b` (j counts MoE layers), inside `lora_state_dict`.

`LoraBatch` applies several adapters in one forward: row b of the batch uses adapter `index[b]` (0 = none).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TextConfig
from ..errors import CheckpointError
from .moe import expert_ends, grouped_mm

TARGETS = ("qkv", "proj", "fc1", "fc2")
_RAW_RENAMES = (  # Phi-style names in raw variant files -> ours (spec §7)
    ("text_model.transformer.h", "text.blocks"),
    (".mixer", ".attn"),
    (".out_proj", ".proj"),
    (".Wqkv", ".qkv"),
    (".parametrizations.weight.0", ""),
)


@dataclass(frozen=True)
class Adapter:
    """Per layer and target, A (r, in) and B (out, r). A fine-tune may also bring its own region head
    and vision encoder (weight trees shaped like the model's `region` / `vision`); None = the model's."""

    name: str
    layers: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], ...]
    region: nn.Module | None = None
    vision: nn.Module | None = None

    @property
    def rank(self) -> int:
        """The largest rank of one linear map (an expert's, for MoE layers)."""
        return max(a.shape[-2] for layer in self.layers for a, _ in layer.values())

    def to(self, device: torch.device, dtype: torch.dtype) -> Adapter:
        layers = tuple({t: (a.to(device, dtype), b.to(device, dtype)) for t, (a, b) in layer.items()} for layer in self.layers)
        return Adapter(self.name, layers, _moved(self.region, device, dtype), _moved(self.vision, device, dtype))


def _moved(w: nn.Module | None, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
    """A copy on (device, dtype), or `w` itself when it is already there (`Module.to` works in place)."""
    if w is None:
        return None
    p = next(w.parameters())
    return w if (p.device, p.dtype) == (torch.device(device), dtype) else copy.deepcopy(w).to(device, dtype)


def target_shapes(cfg: TextConfig, layer: int = 0) -> dict[str, tuple[int, int]]:
    """(in, out) of each adapted linear map of a layer; per expert in a MoE layer (see `n_experts`)."""
    ff_in, ff_out = (
        (2 * cfg.moe.expert_inner_dim, cfg.moe.expert_inner_dim) if cfg.moe and cfg.is_moe(layer) else (cfg.ff_dim,) * 2
    )
    return {"qkv": (cfg.dim, cfg.qkv_dim), "proj": (cfg.dim, cfg.dim), "fc1": (cfg.dim, ff_in), "fc2": (ff_out, cfg.dim)}


def n_experts(cfg: TextConfig, layer: int, target: str) -> int | None:
    """Experts a target's A and B are stacked over (their leading dimension); None for a dense map."""
    return cfg.moe.num_experts if cfg.moe and cfg.is_moe(layer) and target in ("fc1", "fc2") else None


_KESTREL_KEY = re.compile(r"(?:^|\.)(dense|moe)\.(\d+)\.(up|down)_([ab])$")


def _block_key(key: str, cfg: TextConfig) -> tuple[int, str, str] | None:
    """'text.blocks.3.attn.qkv.A' -> (3, 'qkv', 'A'); Kestrel's '…moe.0.up_a' -> (moe.start_layer, 'fc1', 'A')."""
    if k := _KESTREL_KEY.search(key):
        layer = int(k[2]) + (cfg.moe.start_layer if k[1] == "moe" and cfg.moe else 0)
        return layer, "fc1" if k[3] == "up" else "fc2", k[4].upper()
    for old, new in _RAW_RENAMES:
        key = key.replace(old, new)
    parts = key.split(".")
    if len(parts) != 6 or parts[:2] != ["text", "blocks"] or parts[4] not in TARGETS or parts[5] not in ("A", "B"):
        return None
    return int(parts[2]), parts[4], parts[5]


def adapter_from_state_dict(name: str, state: dict[str, torch.Tensor], cfg: TextConfig) -> Adapter:
    """A variant state dict (raw Phi-style, renamed or Kestrel keys) checked against the model's shapes."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        parsed = _block_key(key, cfg)
        if parsed is None:
            unknown.append(key)
            continue
        layer, target, part = parsed
        found.setdefault((layer, target), {})[part] = value
    if any("vision_lora." in k for k in unknown):  # Kestrel defines the class, but its runtime refuses it too
        raise CheckpointError(f"adapter {name!r}: a LoRA on the vision projection (vision_lora.*) is not supported")
    if unknown:
        raise CheckpointError(f"adapter {name!r}: unexpected keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(cfg.n_layers)]
    for (layer, target), parts in sorted(found.items()):
        if layer >= cfg.n_layers or set(parts) != {"A", "B"}:
            raise CheckpointError(f"adapter {name!r}: layer {layer} {target} needs A and B within {cfg.n_layers} layers")
        a, b = parts["A"], parts["B"]
        d_in, d_out = target_shapes(cfg, layer)[target]
        e = n_experts(cfg, layer, target)
        lead = () if e is None else (e,)
        if (
            a.shape[:-2] != lead
            or b.shape[:-2] != lead
            or a.dim() != b.dim()
            or (a.shape[-1], b.shape[-2], a.shape[-2]) != (d_in, d_out, b.shape[-1])
        ):
            stack = "" if e is None else f"{e}, "
            raise CheckpointError(
                f"adapter {name!r}: layer {layer} {target} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"expected A ({stack}r, {d_in}) and B ({stack}{d_out}, r)"
            )
        layers[layer][target] = (a.float(), b.float())
    if not found:
        raise CheckpointError(f"adapter {name!r} holds no LoRA weights")
    return Adapter(name, tuple(layers))


def load_adapter(path: str | Path, cfg: TextConfig) -> Adapter:
    """A variant file (`torch.save` dict, e.g. final.pt) or a safetensors file; a directory holding one."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / n for n in ("adapter.safetensors", "final.pt", "adapter.pt")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise CheckpointError(f"{path} holds none of {', '.join(p.name for p in candidates)}")
        path = found
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("lora_state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a LoRA state dict")
    return adapter_from_state_dict(path.stem if path.stem not in ("final", "adapter") else path.parent.name, state, cfg)


class LoraBatch:
    """The adapters of one forward: `index[b]` is row b's adapter, 1-based into `adapters` (0 = none).
    Rows are grouped by adapter, so a batch costs one pair of small matmuls per adapter present."""

    def __init__(self, adapters: list[Adapter], index: list[int], device: torch.device):
        self.groups = [
            (adapter, torch.tensor(rows, device=device))
            for j, adapter in enumerate(adapters, start=1)
            if (rows := [b for b, i in enumerate(index) if i == j])
        ]
        self.all_rows = len(self.groups) == 1 and len(self.groups[0][1]) == len(index)

    @classmethod
    def single(cls, adapter: Adapter | None, batch: int, device: torch.device) -> LoraBatch | None:
        return None if adapter is None else cls([adapter], [1] * batch, device)

    def expert_delta(
        self, layer: int, target: str, x_MC: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor | None:
        """The MoE form of `delta`: assignment m (sorted by expert `experts[m]`, from batch row `rows[m]`) gets
        B_e A_e x_m of its row's adapter, one grouped matmul pair per adapter."""
        out = None
        for adapter, adapter_rows in self.groups:
            if (ab := adapter.layers[layer].get(target)) is None:
                continue
            a, b = ab
            take = slice(None) if self.all_rows else torch.isin(rows, adapter_rows)
            ends = expert_ends(experts[take], a.shape[0])
            d = grouped_mm(grouped_mm(x_MC[take], a, ends), b, ends)
            if self.all_rows:
                return d
            if out is None:
                out = x_MC.new_zeros(x_MC.shape[0], b.shape[1])
            out[take] = d
        return out

    def delta(self, layer: int, target: str, x_BTC: torch.Tensor) -> torch.Tensor | None:
        out = None
        for adapter, rows in self.groups:
            if (ab := adapter.layers[layer].get(target)) is None:
                continue
            a, b = ab
            if self.all_rows:
                return (x_BTC @ a.T) @ b.T
            if out is None:
                out = x_BTC.new_zeros(*x_BTC.shape[:-1], b.shape[0])
            out[rows] = (x_BTC[rows] @ a.T) @ b.T
        return out
