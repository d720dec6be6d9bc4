"""Typed errors. Every user-facing failure is one of these, with a message that says what to do."""


class MoonbaseError(Exception):
    """Base class for moonbase errors."""


class ConfigError(MoonbaseError, ValueError):
    """A model configuration is inconsistent or malformed."""


class CheckpointError(MoonbaseError):
    """A checkpoint does not match the model it is loaded into."""


class ModelNotFoundError(MoonbaseError, LookupError):
    """A model name, directory or hub id could not be resolved."""


class ImageError(MoonbaseError, ValueError):
    """An image could not be decoded or is not acceptable (empty, truncated, too large)."""


class SettingsError(MoonbaseError, ValueError):
    """Generation settings or skill arguments are invalid."""


class SkillNotSupportedError(MoonbaseError):
    """The model cannot run this skill (Moondream 2 has no segmentation head)."""


class AdapterNotFoundError(ModelNotFoundError):
    """A LoRA adapter (variant) name or path could not be resolved."""


class CapacityError(MoonbaseError, MemoryError):
    """A request cannot fit the engine's KV memory or step budget, even alone: lower max_tokens, or give the
    engine more KV memory (`kv_memory_mb`, `--kv-memory`)."""


class RequestTimeoutError(MoonbaseError, TimeoutError):
    """A request did not finish within its time limit; it was cancelled."""


class TuningError(MoonbaseError, ValueError):
    """Fine-tuning input is invalid (a data file line, a train-step group, a rollout sent back edited)."""


class FinetuneNotFoundError(ModelNotFoundError):
    """No finetune (or no checkpoint at that step) with that id."""


class FinetuneConflictError(MoonbaseError):
    """A finetune with that name exists with another rank."""


class IdempotencyKeyReusedError(MoonbaseError):
    """An idempotency key came back with a different request body."""
