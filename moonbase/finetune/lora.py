"""Trainable LoRA over the existing adapter machinery (`model/lora.py`): parameters A (r, in) and B (out, r)
per text block and target; forward passes use them as an `Adapter` with the scale alpha/r folded into B,
so training, rollouts (the engine) and serving apply exactly the same function. Export writes the
Moondream variant layout (scale folded, no alpha); PEFT import and export convert scale and key names.

PEFT and the variant format disagree about `proj`: a PEFT LoRA on `attn.proj` reads proj's own input (the
attention output), the variant convention reads the attention input (finetuning.md §7). They are
different functions, so a PEFT adapter with `proj` weights is refused unless it was written by moonbase
(its config says `moonbase_proj_input: "attn_input"`); train with `targets=("qkv", "fc1", "fc2")` for
an adapter that any PEFT consumer applies exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path, write_text_atomic
from ..config import TextConfig
from ..errors import CheckpointError
from ..model.lora import TARGETS, Adapter, n_experts, target_shapes

RANKS = (8, 16, 24, 32)
_MODULE = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float | None = None  # None: 2 * rank (scale 2)
    targets: tuple[str, ...] = TARGETS
    train_region: bool = False  # also train the region decoders (detect/point)
    train_vision: bool = False  # also train the vision encoder (rarely worth it below ~100k images)

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else 2.0 * self.rank) / self.rank

    def validate(self) -> LoraConfig:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= 512:
            raise ValueError(f"rank must be an integer in 1..512, got {self.rank!r}")
        if not self.targets or set(self.targets) - set(TARGETS):
            raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {self.targets!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self) | {"targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        known = {k: v for k, v in d.items() if k in ("alpha", "train_region", "train_vision")}  # missing ones: the defaults
        return cls(d["rank"], targets=tuple(d.get("targets", TARGETS)), **known)


class TrainableLora(nn.Module):
    """A and B of every (layer, target). A starts random (Kaiming-uniform, as PEFT), B at zero: the
    adapter starts as the identity and its first gradient steps move B."""

    def __init__(self, text: TextConfig, cfg: LoraConfig, seed: int = 0):
        super().__init__()
        self.cfg, self.n_layers = cfg, text.n_layers
        if text.moe and cfg.rank % text.moe.experts_per_token:
            k = text.moe.experts_per_token
            raise ValueError(f"rank {cfg.rank} must be a multiple of {k} (the active experts) for this model")
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for i in range(text.n_layers):
            for t in cfg.targets:
                d_in, d_out = target_shapes(text, i)[t]
                e = n_experts(text, i, t)  # MoE: each expert gets rank / active experts (Kestrel's split)
                lead, r = ((), cfg.rank) if e is None else ((e,), cfg.rank // text.moe.experts_per_token)
                bound = 1 / math.sqrt(d_in)
                self.a[f"{i}_{t}"] = nn.Parameter((torch.rand(*lead, r, d_in, generator=g) * 2 - 1) * bound)
                self.b[f"{i}_{t}"] = nn.Parameter(torch.zeros(*lead, d_out, r))

    def adapter(self, name: str, detach: bool = False) -> Adapter:
        """The adapter these parameters define (scale folded into B). With `detach`, a frozen copy."""
        s, layers = self.cfg.scale, []
        for i in range(self.n_layers):
            layer = {t: (self.a[f"{i}_{t}"], self.b[f"{i}_{t}"] * s) for t in self.cfg.targets}
            layers.append({t: (a.detach().clone(), b.detach().clone()) for t, (a, b) in layer.items()} if detach else layer)
        return Adapter(name, tuple(layers))

    def variant_state(self) -> dict[str, torch.Tensor]:
        """The Moondream variant layout (`text.blocks.{i}.attn.qkv.A` ...), scale folded into B."""
        out = {}
        for i, layer in enumerate(self.adapter("export", detach=True).layers):
            for t, (a, b) in layer.items():
                key = f"text.blocks.{i}.{_MODULE[t]}"
                out[f"{key}.A"], out[f"{key}.B"] = a.float().cpu().contiguous(), b.float().cpu().contiguous()
        return out

    def load_variant_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `variant_state` (B divided by the scale)."""
        with torch.no_grad():
            for i in range(self.n_layers):
                for t in self.cfg.targets:
                    key = f"text.blocks.{i}.{_MODULE[t]}"
                    if f"{key}.A" not in state:
                        raise CheckpointError(f"adapter state lacks {key}.A")
                    self.a[f"{i}_{t}"].copy_(state[f"{key}.A"])
                    self.b[f"{i}_{t}"].copy_(state[f"{key}.B"] / self.cfg.scale)


def export_peft(variant: dict[str, torch.Tensor], cfg: LoraConfig, directory: Path, base_model: str) -> Path:
    """A PEFT adapter directory: adapter_config.json + adapter_model.safetensors (+ README.md). B is stored
    unscaled (PEFT multiplies by lora_alpha / r)."""
    from safetensors.torch import save_file

    if any(v.dim() != 2 for v in variant.values()):
        raise CheckpointError("a Moondream 3 adapter's per-expert stacks have no PEFT form; serve its checkpoint file instead")
    directory.mkdir(parents=True, exist_ok=True)
    alpha = cfg.alpha if cfg.alpha is not None else 2.0 * cfg.rank
    tensors = {}
    for key, value in variant.items():
        module, part = key.rsplit(".", 1)
        scale = 1.0 if part == "A" else cfg.rank / alpha
        tensors[f"base_model.model.{module}.lora_{part}.weight"] = (value * scale).contiguous()
    config = {
        "peft_type": "LORA",
        "r": cfg.rank,
        "lora_alpha": alpha,
        "target_modules": sorted(cfg.targets),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "lora_dropout": 0.0,
        "moonbase_proj_input": "attn_input",  # see the module docstring
    }
    with atomic_path(directory / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    readme = f"# LoRA adapter for {base_model}\n\nExported by moonbase. Targets: {', '.join(sorted(cfg.targets))}.\n"
    readme += "proj adapts the attention input (Moondream variant convention), not proj's own input.\n"
    for file, text in (("adapter_config.json", json.dumps(config, indent=2)), ("README.md", readme)):
        write_text_atomic(directory / file, text)
    return directory


def import_peft(directory: Path) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A PEFT adapter directory -> (variant state with the scale folded into B, its LoraConfig)."""
    cfg_file = directory / "adapter_config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{directory} has no adapter_config.json (not a PEFT adapter)")
    config = json.loads(cfg_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{directory}: peft_type {config.get('peft_type')!r} is not LORA")
    weights = directory / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        raw = load_file(str(weights))
    elif (directory / "adapter_model.bin").is_file():
        raw = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{directory} has no adapter_model.safetensors or adapter_model.bin")
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    state, targets = {}, set()
    for key, value in raw.items():
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".A").replace(".lora_B.weight", ".B")
        name = name.replace(".lora_A.default.weight", ".A").replace(".lora_B.default.weight", ".B")
        parts = name.split(".")
        if len(parts) != 6 or parts[:2] != ["text", "blocks"] or parts[4] not in TARGETS or parts[5] not in ("A", "B"):
            raise CheckpointError(f"{directory}: unexpected PEFT key {key!r} (expected text.blocks.N.attn.qkv.lora_A.weight ...)")
        targets.add(parts[4])
        state[name] = value.float() * (scale if parts[5] == "B" else 1.0)
    if "proj" in targets and config.get("moonbase_proj_input") != "attn_input":
        raise CheckpointError(
            f"{directory}: a PEFT LoRA on proj reads the attention output, Moondream adapters read the attention "
            "input; the two cannot be converted. Train without proj (targets qkv, fc1, fc2)."
        )
    return state, LoraConfig(rank, scale * rank, tuple(t for t in TARGETS if t in targets))  # our scale = alpha / rank
