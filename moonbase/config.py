"""Model configuration: frozen dataclasses, presets, and the reference `config.json` format.

Field names follow the reference `MoondreamConfig` so a reference `config.json` loads as is. Every
number the reference hard-codes (crop 378, grid 27, prefix 730, context 2048, rotary 32, 1024 bins)
is either a field here or derived from one. Moondream 3 is a configuration of the same code (`md3()`): a
mixture-of-experts text FFN, tau attention, a LayerNorm + Linear region head and its prompt conventions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class VisionConfig:
    enc_dim: int = 1152
    enc_patch_size: int = 14
    enc_n_layers: int = 27
    enc_ff_dim: int = 4304
    enc_n_heads: int = 16
    proj_inner_dim: int = 8192
    proj_out_dim: int = 2048
    crop_size: int = 378
    in_channels: int = 3
    max_crops: int = 12
    overlap_margin: int = 4  # in patches
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.crop_size // self.enc_patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.enc_patch_size**2

    @property
    def head_dim(self) -> int:
        return self.enc_dim // self.enc_n_heads

    @property
    def margin_px(self) -> int:
        return self.overlap_margin * self.enc_patch_size

    @property
    def window_px(self) -> int:
        """Stride between local tiles: a crop minus the margin on both sides."""
        return self.crop_size - 2 * self.margin_px

    def validate(self) -> None:
        if self.crop_size % self.enc_patch_size:
            raise ConfigError(f"crop_size {self.crop_size} is not a multiple of patch {self.enc_patch_size}")
        if self.enc_dim % self.enc_n_heads:
            raise ConfigError(f"vision enc_dim {self.enc_dim} not divisible by {self.enc_n_heads} heads")
        if self.window_px <= 0:
            raise ConfigError(f"overlap_margin {self.overlap_margin} leaves no window in a {self.grid}-patch crop")
        if self.max_crops < 1:
            raise ConfigError("max_crops must be >= 1")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts FFN from `start_layer` on (Moondream 3: 64 experts, top-8, inner 1024, from layer 4)."""

    num_experts: int = 64
    start_layer: int = 4
    experts_per_token: int = 8
    expert_inner_dim: int = 1024


@dataclass(frozen=True)
class TextConfig:
    dim: int = 2048
    ff_dim: int = 8192
    n_layers: int = 24
    vocab_size: int = 51200
    max_context: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int | None = None  # None: dim // n_heads
    rotary_dim: int = 32
    rope_theta: float = 10000.0
    group_size: int | None = None  # int4 checkpoints: quantization group (128)
    layer_norm_eps: float = 1e-5
    moe: MoEConfig | None = None
    tau_attn: bool = False  # learned per-token, per-position scaling of q and v (Moondream 3)
    tau_gelu: str = "exact"  # the GELU of tau's token features: "exact" (HF, vLLM) or "tanh" (Kestrel, spec D1)

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.hd

    def validate(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"text dim {self.dim} not divisible by {self.n_heads} heads")
        if self.rotary_dim % 2 or self.rotary_dim > self.hd:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and <= head dim {self.hd}")
        if self.tau_attn and self.n_kv_heads != self.n_heads:
            raise ConfigError("tau attention scales v per query head: it needs n_kv_heads == n_heads (spec D8)")
        if self.tau_gelu not in ("exact", "tanh"):
            raise ConfigError(f"tau_gelu must be 'exact' or 'tanh', got {self.tau_gelu!r}")
        if (e := self.moe) and not (0 < e.experts_per_token <= e.num_experts and 0 <= e.start_layer < self.n_layers):
            raise ConfigError(f"moe {e} needs 0 < experts_per_token <= num_experts and start_layer < n_layers")

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.start_layer


@dataclass(frozen=True)
class RegionConfig:
    dim: int = 2048
    coord_feat_dim: int = 256
    coord_out_dim: int = 1024  # coordinate bins
    size_feat_dim: int = 512
    size_out_dim: int = 2048  # 2 x size bins (w, h)
    inner_dim: int = 8192
    group_size: int | None = None
    size_decoding: str = "log"  # "linear" for checkpoints before 2025-03-27
    size_min_log2: float = -10.0  # smallest decodable size is 2**size_min_log2
    decoder_arch: str = "mlp"  # "mlp" (Moondream 2: dim -> inner_dim -> bins) or "linear" (Moondream 3)
    use_ln: bool = False  # a LayerNorm `region.ln` before both decoders (Moondream 3, spec D5)

    @property
    def coord_bins(self) -> int:
        return self.coord_out_dim

    @property
    def size_bins(self) -> int:
        return self.size_out_dim // 2

    def validate(self) -> None:
        if self.size_out_dim % 2:
            raise ConfigError("size_out_dim must hold two halves (w, h)")
        if self.coord_feat_dim % 2 or self.size_feat_dim % 4:
            raise ConfigError("Fourier feature dims must split into cos/sin halves")
        if self.size_decoding not in ("log", "linear"):
            raise ConfigError(f"size_decoding must be 'log' or 'linear', got {self.size_decoding!r}")
        if self.decoder_arch not in ("mlp", "linear"):
            raise ConfigError(f"decoder_arch must be 'mlp' or 'linear', got {self.decoder_arch!r}")


def _ids(x: Any) -> tuple[int, ...]:
    return tuple(int(i) for i in x)


@dataclass(frozen=True)
class TokenizerConfig:
    bos_id: int = 0
    eos_id: int = 0
    answer_id: int = 3
    thinking_id: int = 4
    coord_id: int = 5
    size_id: int = 6
    start_ground_points_id: int = 7
    end_ground_id: int = 9
    caption: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {
            "short": (1, 32708, 2, 12492, 3),
            "normal": (1, 32708, 2, 6382, 3),
            "long": (1, 32708, 2, 4059, 3),
        }
    )
    query_prefix: tuple[int, ...] = (1, 15381, 2)
    query_suffix: tuple[int, ...] = (3,)
    detect_prefix: tuple[int, ...] = (1, 7235, 476, 2)
    detect_suffix: tuple[int, ...] = (3,)
    point_prefix: tuple[int, ...] = (1, 2581, 2)
    point_suffix: tuple[int, ...] = (3,)
    segment_prefix: tuple[int, ...] = ()  # () = the model has no segment template (Moondream 2)
    segment_suffix: tuple[int, ...] = ()
    # Moondream 2 ends a query with the suffix and then the mode token: the suffix again, or thinking (spec
    # D1); Moondream 3 with the mode token alone (the suffix, or thinking instead of it).
    repeat_query_suffix: bool = True
    # Detect/point prompts encode " " + object, as the reference does.
    object_leading_space: bool = True
    # Moondream 3: after the first object, "another object?" compares only the coord and eos logits (D9).
    restricted_object_decisions: bool = False

    def all_ids(self) -> list[int]:
        ids = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_id")]
        ids += [i for template in self.caption.values() for i in template]
        for task in PREFIX_SUFFIX_TEMPLATES:
            ids += [*getattr(self, f"{task}_prefix"), *getattr(self, f"{task}_suffix")]
        return ids

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: TokenizerConfig | None = None) -> TokenizerConfig:
        d = dict(d)
        if (t := d.pop("templates", None)) is not None:
            d["caption"] = t["caption"]
            for task in t.keys() & set(PREFIX_SUFFIX_TEMPLATES):
                d[f"{task}_prefix"], d[f"{task}_suffix"] = t[task]["prefix"], t[task]["suffix"]
        for key in d.keys() & {f"{task}_{part}" for task in PREFIX_SUFFIX_TEMPLATES for part in ("prefix", "suffix")}:
            d[key] = _ids(d[key])
        if "caption" in d:
            d["caption"] = {n: _ids(x) for n, x in d["caption"].items()}
        return _build(cls, d, "tokenizer", base)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["templates"] = {"caption": {k: list(v) for k, v in d.pop("caption").items()}}
        for task in PREFIX_SUFFIX_TEMPLATES:
            template = {"prefix": list(d.pop(f"{task}_prefix")), "suffix": list(d.pop(f"{task}_suffix"))}
            if template["prefix"]:
                d["templates"][task] = template
        return d


@dataclass(frozen=True)
class Defaults:
    """Per-model default generation settings (reference MD2 defaults)."""

    temperature: float = 0.5
    top_p: float = 0.3
    max_tokens: int = 768
    max_objects: int = 50
    reasoning: bool = False  # a query that does not say reasons first (Moondream 3: yes)


PREFIX_SUFFIX_TEMPLATES = ("query", "detect", "point", "segment")  # the config's `templates` with a prefix and a suffix
MOONDREAM3_KEYS = {"moe", "tau_attn"}  # text keys that make a reference config.json a Moondream 3 one
# Keys of a reference config.json that we read but deliberately ignore: the reference never reads
# prefix_attn either; we derive the prefix length from the vision grid.
_IGNORED = {"text": {"prefix_attn"}}


def _build(cls: type, d: dict[str, Any], section: str, base: Any = None) -> Any:
    """`base` with the keys of `d` (a config.json section) replaced; the dataclass defaults without a base."""
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(d) - names - _IGNORED.get(section, set()):
        raise ConfigError(f"unknown {section} config keys: {sorted(unknown)}")
    d = {k: v for k, v in d.items() if k in names}
    if isinstance(d.get("moe"), dict):
        d["moe"] = _build(MoEConfig, d["moe"], "text.moe")
    return dataclasses.replace(base, **d) if base is not None else cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    defaults: Defaults = field(default_factory=Defaults)

    @property
    def prefix_len(self) -> int:
        """BOS + one token per vision patch of the (pooled) grid."""
        return 1 + self.vision.n_patches

    def validate(self) -> ModelConfig:
        for part in (self.vision, self.text, self.region):
            part.validate()
        if self.vision.proj_out_dim != self.text.dim or self.region.dim != self.text.dim:
            raise ConfigError(
                f"projection dim {self.vision.proj_out_dim} and region dim {self.region.dim} must equal text dim {self.text.dim}"
            )
        if (top := max(self.tokenizer.all_ids())) >= self.text.vocab_size:
            raise ConfigError(f"template id {top} does not fit vocab_size {self.text.vocab_size}")
        if self.prefix_len >= self.text.max_context:
            raise ConfigError(f"image prefix ({self.prefix_len}) does not fit max_context {self.text.max_context}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if unknown := set(d) - set(SECTIONS):
            raise ConfigError(f"unknown config sections: {sorted(unknown)}")
        # A Moondream 3 config.json names only what its reference reads: its own conventions fill the rest.
        base = md3() if any(d.get("text", {}).get(k) for k in MOONDREAM3_KEYS) else cls()
        sections = {}
        for name, kind in SECTIONS.items():
            given, default = d.get(name, {}), getattr(base, name)
            sections[name] = (
                TokenizerConfig.from_dict(given, default) if kind is TokenizerConfig else _build(kind, given, name, default)
            )
        return cls(**sections).validate()

    def to_dict(self) -> dict[str, Any]:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        return d | {"tokenizer": self.tokenizer.to_dict()}  # its own format, in the same place

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        d = json.loads(Path(path).read_text())
        if "config" in d and "model_type" in d and not set(d) & {"text", "vision", "region"}:
            # The Hugging Face wrapper's config.json: the reference discards its contents and uses
            # the default config, so do we (shapes are still validated against the checkpoint).
            return md3() if "moondream3" in str(d["model_type"]).lower() else md2()
        return cls.from_dict(d)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(ModelConfig)}  # "vision": VisionConfig, ...


def md2() -> ModelConfig:
    """Moondream 2 (2B), the 2025-06-21 generation with the starmie-v1 tokenizer."""
    return ModelConfig().validate()


def md3() -> ModelConfig:
    """Moondream 3 preview (9B total, 2B active): Moondream 2's vision and tokenizer, a mixture-of-experts text
    decoder with tau attention and RoPE theta 1.5e6, a LayerNorm + Linear region head (spec §1). Context 32K as
    Kestrel serves it (the HF config says 4096; only tables and caches depend on it, spec D2)."""
    return ModelConfig(
        text=TextConfig(max_context=32768, rope_theta=1_500_000.0, moe=MoEConfig(), tau_attn=True),
        region=RegionConfig(decoder_arch="linear", use_ln=True),
        tokenizer=TokenizerConfig(
            segment_prefix=(1, 17374, 2), segment_suffix=(3,), repeat_query_suffix=False, restricted_object_decisions=True
        ),
        defaults=Defaults(top_p=0.9, max_objects=150, reasoning=True),
    ).validate()
