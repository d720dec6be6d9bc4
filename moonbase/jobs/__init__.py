"""Jobs over many images: `moonbase batch` (folders, lists, JSONL, Parquet; resumable JSONL/Parquet output)."""

from .batch import batch, parse_tasks, run_batch, task_label
from .inputs import Item, count_inputs, read_inputs
from .journal import Journal

__all__ = ["batch", "parse_tasks", "run_batch", "task_label", "Item", "count_inputs", "read_inputs", "Journal"]
