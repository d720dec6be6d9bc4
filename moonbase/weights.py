"""Checkpoint loading: one name table, strict name/shape checks, int4 dequantization, meta-device build.

Accepted layouts: the Hugging Face `model.`-prefixed names (what `vikhyatk/moondream2` ships), the same
names without the prefix (the reference fine-tuning scripts, which also save KV buffers), torch.compile
residue (`._orig_mod`), the 2024 Phi-style legacy names, and int4 "at rest" checkpoints whose linear
weights are stored as `weight.packed` / `weight.scale` / `weight.zero_point`. A checkpoint is one file
(`.safetensors` or `.pt`) or a sharded safetensors set named by its `model.safetensors.index.json`
(Moondream 3), loaded shard by shard: host memory peaks at the model plus one tensor being converted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

_T = Callable[[torch.Tensor], torch.Tensor]
_transpose: _T = lambda t: t.T.contiguous()  # noqa: E731

# The one name table: (pattern, replacement, transform applied to the stored tensor).
NAME_TABLE: list[tuple[str, str, _T | None]] = [
    (r"^model\.", "", None),
    (r"\._orig_mod", "", None),
    # 2024 Phi-style legacy layout
    (r"^vision_encoder\.encoder\.model\.visual\.patch_embed\.linear\.", "vision.patch_emb.", None),
    (r"^vision_encoder\.encoder\.model\.visual\.pos_embed$", "vision.pos_emb", None),
    (r"^vision_encoder\.encoder\.model\.visual\.norm\.", "vision.post_ln.", None),
    (r"^vision_encoder\.encoder\.model\.visual\.blocks\.(\d+)\.norm([12])\.", r"vision.blocks.\1.ln\2.", None),
    (r"^vision_encoder\.encoder\.model\.visual\.blocks\.(\d+)\.(attn|mlp)\.", r"vision.blocks.\1.\2.", None),
    (r"^vision_encoder\.projection\.mlp\.", "vision.proj_mlp.", None),
    (r"^text_model\.transformer\.embd\.wte\.weight$", "text.wte", None),
    (r"^text_model\.transformer\.h\.(\d+)\.ln\.", r"text.blocks.\1.ln.", None),
    (r"^text_model\.transformer\.h\.(\d+)\.mixer\.Wqkv\.", r"text.blocks.\1.attn.qkv.", None),
    (r"^text_model\.transformer\.h\.(\d+)\.mixer\.out_proj\.", r"text.blocks.\1.attn.proj.", None),
    (r"^text_model\.transformer\.h\.(\d+)\.mlp\.", r"text.blocks.\1.mlp.", None),
    (r"^text_model\.lm_head\.ln\.", "text.post_ln.", None),
    (r"^text_model\.lm_head\.linear\.", "text.lm_head.", None),
    (r"^region_model\.coordinate_features\.weight$", "region.coord_features", _transpose),
    (r"^region_model\.size_features\.weight$", "region.size_features", _transpose),
    (r"^region_model\.coordinate_(encoder|decoder)\.", r"region.coord_\1.", None),
    (r"^region_model\.size_(encoder|decoder)\.", r"region.size_\1.", None),
]

# Buffers some checkpoints carry that are not weights (KV caches, masks, RoPE tables).
IGNORED = re.compile(r"(^|\.)(kv_cache\.[kv]_cache|attn_mask|freqs_cis)$")
INT4_PARTS = ("packed", "scale", "zero_point")


@dataclass(frozen=True)
class Source:
    """Where a model tensor comes from in the checkpoint."""

    keys: tuple[str, ...]  # one key, or the packed/scale/zero_point triple
    shape: tuple[int, ...]  # the model-side shape this source produces
    transform: _T | None = None

    @property
    def int4(self) -> bool:
        return len(self.keys) == 3


def canonical_name(key: str) -> tuple[str, _T | None]:
    transform = None
    for pattern, repl, t in NAME_TABLE:
        new = re.sub(pattern, repl, key)
        if new != key:
            key, transform = new, t or transform
    return key, transform


def plan_sources(header: dict[str, tuple[int, ...]]) -> tuple[dict[str, Source], list[str]]:
    """Map checkpoint keys (name -> shape) to model names. Returns (sources, problems)."""
    sources: dict[str, Source] = {}
    problems: list[str] = []
    groups: dict[str, dict[str, str]] = {}
    for key, shape in header.items():
        name, transform = canonical_name(key)
        if IGNORED.search(name):
            continue
        base, _, part = name.rpartition(".")
        if part in INT4_PARTS and base.endswith(".weight"):
            groups.setdefault(base, {})[part] = key
            continue
        if name in sources:
            problems.append(f"duplicate: {key} and {sources[name].keys[0]} both map to {name}")
        shape = tuple(shape)
        sources[name] = Source((key,), shape[::-1] if transform is _transpose else shape, transform)
    for name, parts in groups.items():
        if set(parts) != set(INT4_PARTS):
            problems.append(f"incomplete int4 weight {name}: has {sorted(parts)}, needs {list(INT4_PARTS)}")
            continue
        n = header[parts["scale"]][0] * header[parts["packed"]][1]  # groups x group size = out * in (the model has the 2-D shape)
        sources[name] = Source(tuple(parts[p] for p in INT4_PARTS), (n,))
    return sources, problems


def check_sources(
    sources: dict[str, Source], expected: dict[str, tuple[int, ...]], header: dict[str, tuple[int, ...]]
) -> list[str]:
    """Strict comparison with the model's parameter shapes; returns human-readable problems."""
    problems = []
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected))
    misshaped = []
    for name in sorted(set(expected) & set(sources)):
        src, want = sources[name], tuple(expected[name])
        if src.int4:
            packed, scale, zero = (tuple(header[k]) for k in src.keys)
            out_in, g = (want[0] * want[1] if len(want) == 2 else -1), packed[1]
            if not (len(packed) == 2 and 2 * g * packed[0] == out_in and scale == zero == (out_in // g, 1)):
                misshaped.append(f"{name}: int4 packed {packed}, scale {scale}, zero_point {zero} cannot form {want}")
        elif src.shape != want:
            misshaped.append(f"{name}: checkpoint {src.shape} vs model {want}")
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {label}:\n    {shown}")
    return problems


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Groups of `packed.shape[1]` consecutive row-major weights; the first half of the groups lives in the
    high nibbles, the second half in the low nibbles; w = (q - zero_point) * scale."""
    q = torch.cat([packed >> 4, packed & 0x0F], dim=0).float()
    return ((q - zero_point.float()) * scale.float()).reshape(shape)


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, without reading the data."""
    if path.name.endswith(".index.json"):
        shards = shard_map(path)
        headers = {f: read_header(f) for f in set(shards.values())}
        if missing := [k for k, f in shards.items() if k not in headers[f]]:
            raise CheckpointError(f"{path} lists {len(missing)} tensors its shards do not hold, e.g. {missing[:3]}")
        return {k: headers[f][k] for k, f in shards.items()}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return {k: tuple(v.shape) for k, v in _load_pt(path).items()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch.load raise many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e


def shard_map(index: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from a Hugging Face `*.safetensors.index.json`; shards must sit beside it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read shard index {index}: {e}") from e
    shards = {k: index.parent / f for k, f in weight_map.items()}
    for f in set(shards.values()):
        if f.resolve().parent != index.parent.resolve() or not f.is_file():
            raise CheckpointError(f"{index} names shard {f.name!r}, which is not a file beside it")
    return shards


def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _tensor_reader(path: Path) -> Callable[[str], torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        return safe_open(str(path), framework="pt").get_tensor
    return _load_pt(path).__getitem__


def load_weights(model: nn.Module, path: str | Path, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Materialize `model` (built on the meta device) from a checkpoint file or shard index, strictly: every
    name and shape is checked before any data is read, then each shard's tensors are converted and assigned
    one at a time."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    header = read_header(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sources, problems = plan_sources(header)
    problems += check_sources(sources, expected, header)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model configuration:\n  " + "\n  ".join(problems))
    shards = shard_map(path) if path.name.endswith(".index.json") else dict.fromkeys(header, path)
    for shard in sorted(set(shards.values())):
        get = _tensor_reader(shard)
        for name, src in sources.items():
            if shards[src.keys[0]] != shard:
                continue
            if src.int4:
                t = dequantize_int4(*(_read(shards, k, shard, get) for k in src.keys), expected[name])
            else:
                t = get(src.keys[0]) if src.transform is None else src.transform(get(src.keys[0]))
            model.load_state_dict({name: t.to(device=device, dtype=dtype)}, strict=False, assign=True)
    return model


def _read(shards: dict[str, Path], key: str, shard: Path, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """A tensor of this shard, or of another one (an int4 triple split across shards)."""
    return get(key) if shards[key] == shard else _tensor_reader(shards[key])(key)
