"""Find and load models: built-in names, local model directories, and Hugging Face hub ids.

A model directory holds `model.safetensors` (or `model.pt`), `tokenizer.json` and optionally
`config.json` (our format or the reference `MoondreamConfig` format; the Hugging Face wrapper's config
means "Moondream 2 defaults").
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from .config import ModelConfig, MoEConfig, RegionConfig, TextConfig, TokenizerConfig, VisionConfig, md2, md3
from .device import pick_device, pick_dtype
from .errors import CheckpointError, ModelNotFoundError
from .model.init import init_weights
from .model.moondream import Moondream, build_model
from .tokenizer import TASK_TOKENS, Tokenizer, byte_level_tokenizer, task_token_templates
from .weights import load_weights, read_header

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model.pt")  # a file, or shards and their index
ASSETS = Path(__file__).parent / "assets"


def model_config_for(directory: Path, weights: Path) -> ModelConfig:
    cfg_file = directory / "config.json"
    cfg = ModelConfig.from_file(cfg_file) if cfg_file.is_file() else md2()
    header = read_header(weights)
    packed = [s for k, s in header.items() if k.endswith("weight.packed")]
    if cfg.text.group_size is None and packed:  # int4 checkpoint: the group size is the packed row width (D11)
        g = int(packed[0][1])
        cfg = replace(cfg, text=replace(cfg.text, group_size=g), region=replace(cfg.region, group_size=g))
    if cfg.region.use_ln and not any(k.endswith("region.ln.weight") for k in header):
        cfg = replace(cfg, region=replace(cfg.region, use_ln=False))  # checkpoints before the region LayerNorm (D5)
    return cfg


def load_dir(
    directory: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> Moondream:
    directory = Path(directory)
    weights_file = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights_file is None and (directory / "model_fp8.pt").is_file():
        raise CheckpointError(
            f"{directory}/model_fp8.pt is Kestrel's FP8 layout (float8 experts with per-row scales), which moonbase does "
            "not load; use the bf16 safetensors of moondream/moondream3-preview"
        )
    if weights_file is None:
        raise ModelNotFoundError(f"{directory} has no {' or '.join(WEIGHT_FILES)}")
    if not (directory / "tokenizer.json").is_file():
        raise ModelNotFoundError(f"{directory} has no tokenizer.json")
    cfg = model_config_for(directory, weights_file)
    tokenizer = Tokenizer.from_file(directory / "tokenizer.json", cfg.tokenizer)
    dev = pick_device(device)
    with torch.device("meta"):
        weights = build_model(cfg)
    load_weights(weights, weights_file, dev, pick_dtype(dev, dtype))
    return Moondream(cfg, weights, tokenizer, name=directory.name)


def tiny_config(
    tok: TokenizerConfig,
    vocab_size: int,
    n_kv_heads: int = 2,
    crop_size: int = 56,
    patch: int = 14,
    margin: int = 1,
    max_context: int = 512,
) -> ModelConfig:
    """A few-layer config of the MD2 architecture, for tests and as a stand-in default."""
    return ModelConfig(
        vision=VisionConfig(
            enc_dim=32,
            enc_patch_size=patch,
            enc_n_layers=2,
            enc_ff_dim=64,
            enc_n_heads=2,
            proj_inner_dim=64,
            proj_out_dim=64,
            crop_size=crop_size,
            max_crops=4,
            overlap_margin=margin,
        ),
        text=TextConfig(
            dim=64,
            ff_dim=128,
            n_layers=2,
            vocab_size=vocab_size,
            max_context=max_context,
            n_heads=4,
            n_kv_heads=n_kv_heads,
            rotary_dim=8,
        ),
        region=RegionConfig(
            dim=64, coord_feat_dim=32, coord_out_dim=256, size_feat_dim=32, size_out_dim=512, inner_dim=64, size_min_log2=-8.0
        ),
        tokenizer=tok,
    ).validate()


def tiny_moondream3(cfg: ModelConfig, segment_id: int) -> ModelConfig:
    """The same tiny sizes in the Moondream 3 architecture: tau attention, 4 experts (top-2) from layer 1, the
    LayerNorm + Linear region head, and Moondream 3's prompt conventions and defaults."""
    big = md3()
    text = replace(cfg.text, n_kv_heads=cfg.text.n_heads, moe=MoEConfig(4, 1, 2, 32), tau_attn=True)
    region = replace(cfg.region, decoder_arch="linear", use_ln=True)
    conventions = ("repeat_query_suffix", "restricted_object_decisions", "segment_suffix")
    tok = replace(cfg.tokenizer, segment_prefix=(1, segment_id, 2), **{k: getattr(big.tokenizer, k) for k in conventions})
    return replace(cfg, text=text, region=region, tokenizer=tok, defaults=big.defaults).validate()


def tiny_random(
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    moondream3: bool = False,
    **overrides,
) -> Moondream:
    """A randomly initialized tiny model with a byte-level tokenizer: exercises every code path, knows nothing.
    `moondream3`: the mixture-of-experts architecture (`tiny_moondream3`)."""
    hf_tok = byte_level_tokenizer(TASK_TOKENS + ["<|segment|>"] if moondream3 else TASK_TOKENS)
    cfg = tiny_config(task_token_templates(hf_tok), hf_tok.get_vocab_size(), **overrides)
    if moondream3:
        cfg = tiny_moondream3(cfg, hf_tok.token_to_id("<|segment|>"))
    dev = pick_device(device)
    weights = init_weights(build_model(cfg), seed).to(device=dev, dtype=pick_dtype(dev, dtype))
    return Moondream(cfg, weights, Tokenizer(hf_tok, cfg.tokenizer), name="tiny-moondream3" if moondream3 else "tiny-random")


def nano(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Moondream:
    """The embedded default: a small model of the Moondream architecture trained by this project on synthetic
    data (see moonbase/assets/nano/MODEL_CARD.md)."""
    return load_dir(ASSETS / "nano", device, dtype)  # named after its directory


BUILTIN = {"nano": nano, "tiny-random": tiny_random}
HUB_IDS = {"moondream2": "vikhyatk/moondream2", "moondream3-preview": "moondream/moondream3-preview"}  # short names
DEFAULT_MODEL = "nano" if (ASSETS / "nano" / "model.safetensors").is_file() else "tiny-random"


def load(
    model: str | Path | None = None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> Moondream:
    """Load a model by built-in name, local directory or Hugging Face hub id (from the local hub cache)."""
    model = str(model or DEFAULT_MODEL)
    model = HUB_IDS.get(model, model)
    if model in BUILTIN:
        return BUILTIN[model](device=device, dtype=dtype)
    path = Path(model).expanduser()
    if path.is_dir():
        return load_dir(path, device, dtype)
    if "/" in model and not path.exists():
        return load_dir(hub_snapshot(model), device, dtype)
    raise ModelNotFoundError(f"no model {model!r}: not a built-in ({', '.join(BUILTIN)}), a directory, or a hub id")


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of a hub repo (or a short name of `HUB_IDS`); downloads only when huggingface_hub is
    installed and online."""
    repo_id = HUB_IDS.get(repo_id, repo_id)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed "
            "(pip install huggingface_hub), and it is not a local directory"
        ) from e
    from huggingface_hub.errors import GatedRepoError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except GatedRepoError as e:  # moondream/moondream3-preview: access is granted on request
        raise ModelNotFoundError(
            f"{repo_id!r} is gated: request access on https://huggingface.co/{repo_id} (granted automatically), "
            "then log in with `huggingface-cli login` or set HF_TOKEN, and pull again"
        ) from e
    except Exception as e:  # offline, unknown repo: all end the same way for the user
        raise ModelNotFoundError(f"cannot get {repo_id!r} from the Hugging Face hub: {e}") from e


def local_models() -> list[dict[str, str]]:
    """Built-in models and Moondream snapshots already in the Hugging Face cache."""
    out = [
        {"name": "nano", "kind": "built-in", "note": "embedded default" if DEFAULT_MODEL == "nano" else "weights missing"},
        {"name": "tiny-random", "kind": "built-in", "note": "random weights, for tests"},
    ]
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # huggingface_hub not installed, or no cache directory yet
        return out
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type == "model" and "moondream" in repo.repo_id.lower():
            for rev in repo.revisions:
                if any(f.file_name.endswith(".safetensors") for f in rev.files):
                    out.append({"name": repo.repo_id, "kind": "hub cache", "note": str(rev.snapshot_path)})
    return out


def save_dir(m: Moondream, directory: str | Path) -> Path:
    """Write a model directory (Hugging Face key layout, our config.json, tokenizer.json), each file atomically."""
    from safetensors.torch import save_file

    from .atomic import atomic_path, write_text_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"model." + k: v.detach().contiguous().cpu() for k, v in m.w.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    for name, text in (("config.json", json.dumps(m.cfg.to_dict(), indent=2)), ("tokenizer.json", m.tokenizer.to_str())):
        write_text_atomic(directory / name, text)
    return directory
