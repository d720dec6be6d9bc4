"""The Moondream model: weights, config and tokenizer, with the primitives every inference path builds on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..image import Crops, normalize
from ..tokenizer import Tokenizer
from . import region, text, vision
from .lora import Adapter, LoraBatch
from .rope import rope_table
from .text import EncodedImage, KVCache


def build_model(cfg: ModelConfig) -> nn.Module:
    """The weight tree; state_dict keys are the checkpoint names without the `model.` prefix."""
    m = nn.Module()
    m.vision = vision.build_vision(cfg.vision)
    m.text = text.build_text(cfg.text)
    m.region = region.build_region(cfg.region)
    return m


class Moondream:
    def __init__(self, cfg: ModelConfig, weights: nn.Module, tokenizer: Tokenizer, name: str = "model"):
        self.cfg, self.w, self.tokenizer, self.name = cfg, weights.requires_grad_(False), tokenizer, name
        p = weights.text.wte
        self.device, self.dtype = p.device, p.dtype
        self.rope = rope_table(cfg.text.rotary_dim, cfg.text.max_context, cfg.text.rope_theta, self.device)

    # --- vision -------------------------------------------------------------------------------------
    def embed_crops(self, crops: Sequence[Crops], vision_w: nn.Module | None = None) -> list[torch.Tensor]:
        """Image embeddings (P, D) for several images; all their crops go through the encoder as one batch.
        `vision_w`: other vision weights (a fine-tune's), default the model's.

        A 1x1 tiling's local crop is the global crop resized to the same size, i.e. the same pixels; it is
        encoded once."""
        w = self.w.vision if vision_w is None else vision_w
        unique = [c.pixels[:1] if c.tiling == (1, 1) and np.array_equal(c.pixels[0], c.pixels[1]) else c.pixels for c in crops]
        pixels = torch.cat([normalize(p, self.device, self.dtype) for p in unique])
        feats = vision.encode_crops(pixels, w, self.cfg.vision)
        return [
            vision.image_embeddings(f.expand(len(c.pixels), -1, -1), c.tiling, w, self.cfg.vision)
            for c, f in zip(crops, feats.split([len(p) for p in unique]), strict=True)
        ]

    @torch.no_grad()
    def prefill_image(self, img_emb: torch.Tensor, adapter: Adapter | None = None) -> EncodedImage:
        """BOS + image embeddings through the decoder with bidirectional attention; keeps the K/V. An
        adapter changes the text layers, so the prefix K/V depend on it."""
        bos = self.w.text.wte[self.cfg.tokenizer.bos_id][None]
        cache = KVCache(self.cfg.text, 1, self.device, self.dtype, prefix_len=self.cfg.prefix_len)
        self.hidden(cache, torch.cat([bos, img_emb])[None], adapter, kv_only=True)
        return EncodedImage(cache.prefix(cache.length))

    # --- text ---------------------------------------------------------------------------------------
    def new_cache(self, image: EncodedImage | None = None) -> KVCache:
        if image is not None:
            return KVCache.from_prefix(self.cfg.text, image.kv)
        return KVCache(self.cfg.text, 1, self.device, self.dtype)

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        return self.w.text.wte[torch.tensor(list(ids), device=self.device)]

    def embed_prompt(
        self, ids: Sequence[int], coords: Sequence[float] = (), sizes: Sequence[tuple[float, float]] = ()
    ) -> torch.Tensor:
        """Token embeddings (T, D) with coord/size placeholder rows replaced by region encodings, in order."""
        x = self.embed_ids(ids)
        tok = self.cfg.tokenizer
        for placeholder, values, encode in ((tok.coord_id, coords, self.encode_coords), (tok.size_id, sizes, self.encode_sizes)):
            rows = [i for i, t in enumerate(ids) if t == placeholder]
            if len(rows) != len(values):
                raise ValueError(f"prompt has {len(rows)} placeholders {placeholder} but {len(values)} values")
            if rows:
                x[rows] = encode(values)
        return x

    def encode_coords(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(values, device=self.device).to(self.dtype).reshape(-1, 1)
        return region.encode_coordinate(v, self.w.region)

    def encode_sizes(self, values: Sequence[tuple[float, float]] | torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(values, device=self.device).to(self.dtype).reshape(-1, 2)
        return region.encode_size(v, self.w.region)

    def hidden(
        self,
        cache: KVCache,
        x_BTC: torch.Tensor,
        adapter: Adapter | None = None,
        kv_only: bool = False,
        routes: list[torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Append T input embeddings to the cache; pre-`post_ln` hidden states (B, T, D), or None with
        `kv_only` (only the cached K/V are wanted: see `text.decoder`). `routes` collects MoE router logits."""
        lora = LoraBatch.single(adapter, x_BTC.shape[0], self.device)
        return text.text_hidden(x_BTC, self.w.text, self.cfg.text, cache, self.rope, lora, kv_only, routes)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return text.lm_logits(hidden, self.w.text)

    def decode_coord(self, hidden_BC: torch.Tensor) -> torch.Tensor:
        """(B,) coordinates in [0, 1): argmax bin / bins."""
        return region.coord_from_bin(region.coord_logits(hidden_BC, self.w.region).argmax(-1), self.cfg.region)

    def decode_size(self, hidden_BC: torch.Tensor) -> torch.Tensor:
        """(B, 2) sizes (w, h)."""
        return region.size_from_bin(region.size_logits(hidden_BC, self.w.region).argmax(-1), self.cfg.region)
