"""Parity against golden outputs of the reference implementation (`python -m moonbase parity DIR`).

DIR holds `model.safetensors`, `config.json`, `tokenizer.json`, `images/`, `crops/`, `expected.json` and
`expected.safetensors` (format described in the fixture's README). Every recorded value is recomputed in
float32: crops, vision features, image embeddings, prefix K/V, prefill logits, teacher-forced top-5 logits
along the recorded path, region-decoder inputs and outputs, then greedy ids and returned results end to end.
Model numerics are checked on the fixture's own crop PNGs so that resizing is tested separately.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from .. import image as img_mod
from .. import simple, skills
from ..api import VL
from ..hub import load_dir
from ..image import Crops, load_image, normalize, overlap_crops, tiling_for
from ..model import region, vision
from ..model.rope import k_to_interleaved
from ..model.text import KVCache

# Tolerances from the fixture README ("Suggested tolerances", float32 column).
REL_TOL = 1e-4  # vision outputs, pooled, img_emb, K/V, logits, region logits (and hidden states)
CROP_ABS_TOL = 2.4e-7  # normalized crops: exact up to one ulp
STATS_ABS_TOL = 1e-6  # crop mean/std, recomputed in float64


@dataclass
class Row:
    group: str
    name: str
    ok: bool
    max_abs: float | None = None
    rel: float | None = None
    tol: str = ""
    note: str = ""
    informational: bool = False


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def close(self, group: str, name: str, ours: Any, ref: Any, rel_tol: float | None = REL_TOL, abs_tol: float | None = None) -> float:
        ours_t = torch.as_tensor(ours, dtype=torch.float64).flatten()
        ref_t = torch.as_tensor(ref, dtype=torch.float64).flatten()
        if ours_t.shape != ref_t.shape:
            self.rows.append(Row(group, name, False, note=f"shape {tuple(ours_t.shape)} vs {tuple(ref_t.shape)}"))
            return float("inf")
        max_abs = float((ours_t - ref_t).abs().max()) if len(ref_t) else 0.0
        rel = max_abs / max(float(ref_t.abs().max()), 1e-30) if len(ref_t) else 0.0
        ok = (rel_tol is None or rel <= rel_tol) and (abs_tol is None or max_abs <= abs_tol)
        tol = f"rel {rel_tol:g}" if rel_tol is not None else f"abs {abs_tol:g}"
        self.rows.append(Row(group, name, ok, max_abs, rel, tol))
        return max_abs

    def exact(self, group: str, name: str, ours: Any, ref: Any, informational: bool = False, note: str = "") -> None:
        ok = ours == ref
        if not ok and not note:
            note = f"got {_short(ours)}, expected {_short(ref)}"
        self.rows.append(Row(group, name, ok, tol="exact", note=note, informational=informational))

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok and not r.informational]

    def table(self) -> str:
        lines = [f"{'group':<22} {'check':<34} {'max|d|':>10} {'rel':>10} {'tol':>12}  status"]
        for r in self.rows:
            status = "ok" if r.ok else ("info" if r.informational else "FAIL")
            num = lambda v: f"{v:10.3g}" if v is not None else " " * 10  # noqa: E731
            lines.append(f"{r.group:<22} {r.name:<34} {num(r.max_abs)} {num(r.rel)} {r.tol:>12}  {status}"
                         + (f"  ({r.note})" if r.note else ""))
        worst = max((r for r in self.rows if r.rel is not None), key=lambda r: r.rel, default=None)
        lines.append(f"\n{len(self.rows)} checks, {len(self.failures)} failed"
                     + (f"; largest relative error {worst.rel:.3g} ({worst.group} {worst.name})" if worst else ""))
        return "\n".join(lines)


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) < 120 else s[:117] + "..."


def _same(a: Any, b: Any, tol: float = 1e-12) -> bool:
    """Results compare exactly for strings and ints, floats to `tol` (tuples and lists are the same)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    return a == b


class Parity:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "expected.json").read_text())
        self.tensors = load_file(str(self.dir / "expected.safetensors"))
        self.m = load_dir(self.dir, device="cpu", dtype=torch.float32)
        self.vl = VL(self.m)
        self.report = Report()
        self.encoded: dict[int, Any] = {}

    def t(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def run(self) -> Report:
        self.report.exact("weights", f"{self.meta['weights']['n_tensors']} tensors, strict", True, True)
        for rec in self.meta["images"]:
            self.check_image(rec)
        for case in self.meta["cases"]:
            self.check_case(case)
        return self.report

    # --- images -------------------------------------------------------------------------------------
    def check_image(self, rec: dict[str, Any]) -> None:
        m, r, g, i = self.m, self.report, f"image{rec['index']}", rec["index"]
        cfg = m.cfg.vision
        tiling = tiling_for(rec["height"], rec["width"], cfg)
        r.exact(g, "tiling, n_crops, canvas, grid",
                [list(tiling), 1 + tiling[0] * tiling[1], [tiling[0] * cfg.window_px + 2 * cfg.margin_px, tiling[1] * cfg.window_px + 2 * cfg.margin_px],
                 [tiling[0] * (cfg.grid - 2 * cfg.overlap_margin) + 2 * cfg.overlap_margin, tiling[1] * (cfg.grid - 2 * cfg.overlap_margin) + 2 * cfg.overlap_margin, cfg.enc_dim]],
                [rec["tiling"], rec["n_crops"], rec["resized_canvas_hw"], rec["reconstructed_grid_shape"]])
        ref_px = np.stack([np.asarray(Image.open(self.dir / f).convert("RGB")) for f in rec["crop_files"]])
        own = overlap_crops(load_image(self.dir / rec["file"]), cfg)
        diff = int(np.abs(own.pixels.astype(int) - ref_px.astype(int)).max()) if own.pixels.shape == ref_px.shape else -1
        r.exact(g, f"own crops ({img_mod.RESIZE_BACKEND}) == crop PNGs", diff, 0, informational=img_mod.RESIZE_BACKEND != "pyvips",
                note="" if diff == 0 else f"max pixel difference {diff} (-1: shape)")
        x = normalize(ref_px)
        r.close(g, "crop stats (mean, std)", [x.double().mean((1, 2, 3)).tolist(), x.double().std((1, 2, 3), unbiased=False).tolist()],
                [rec["crop_mean"], rec["crop_std"]], None, STATS_ABS_TOL)
        feats = vision.encode_crops(x, m.w.vision, cfg)
        local = feats[1:].reshape(-1, cfg.grid, cfg.grid, cfg.enc_dim)
        pooled = vision.pool_grid(vision.reconstruct(local, tiling, cfg.overlap_margin), cfg.grid)
        img_emb = vision.project(feats[0], pooled, m.w.vision)
        enc = m.prefill_image(img_emb)
        self.encoded[i] = enc
        last = len(enc.kv) - 1
        ours = {"crop_global": x[0], "crop_local0": x[1], "vis_enc_global": feats[0], "vis_enc_local0": feats[1],
                "pooled_local": pooled, "img_emb": img_emb}
        for key, name in rec["tensors"].items():
            kv = re.fullmatch(r"kv_l(\d+|last)_([kv])", key)
            if kv:
                layer = last if kv[1] == "last" else int(kv[1])
                k_or_v = enc.kv[layer][0 if kv[2] == "k" else 1]
                value = k_to_interleaved(k_or_v, m.cfg.text.rotary_dim) if kv[2] == "k" else k_or_v
            elif key in ours:
                value = ours[key]
            else:
                r.exact(g, key, "recomputed", "unknown tensor key")
                continue
            crop = key.startswith("crop_")
            r.close(g, key, value, self.t(name), None if crop else REL_TOL, CROP_ABS_TOL if crop else None)

    # --- cases --------------------------------------------------------------------------------------
    def prompts(self, call: dict[str, Any], text_only: bool) -> list[skills.Prompt]:
        m, tok = self.m, self.m.cfg.tokenizer
        skill = call["skill"]
        if skill == "caption":
            return [skills.caption_prompt(tok, call.get("length", "normal"))]
        if skill == "query":
            p = skills.query_prompt(m.tokenizer, call["question"], call.get("spatial_refs"), call.get("reasoning", False))
            p = skills.Prompt((tok.bos_id,)) + p if text_only else p
            return [p, skills.Prompt((tok.answer_id,))] if call.get("reasoning") else [p]
        return [skills.object_prompt(m.tokenizer, skill, call["object"], call.get("spatial_refs"))]

    def check_case(self, case: dict[str, Any]) -> None:
        call, info = case["call"], bool(case.get("informational"))
        idx = call.get("image")
        image = None if idx is None else self.encoded[idx]
        if not info:
            self.teacher_force(case, image)
        self.end_to_end(case, image, info)

    def teacher_force(self, case: dict[str, Any], image: Any) -> None:
        m, r, g = self.m, self.report, case["name"]
        prompts = self.prompts(case["call"], image is None)
        inputs: dict[int, torch.Tensor] = {}
        for phase, prompt in zip(case["phases"], prompts):
            r.exact(g, f"{phase['phase']} prompt ids", list(prompt.ids), phase["prompt_ids"])
            emb = m.embed_prompt(phase["prompt_ids"], prompt.coords, prompt.sizes)
            inputs.update({phase["start_pos"] + j: e for j, e in enumerate(emb)})
            for step in phase.get("steps", []):
                inp = step.get("input")
                if inp and inp["type"] == "token":
                    inputs[step["pos"]] = m.embed_ids([inp["id"]])[0]
                elif inp:
                    inputs[step["pos"]] = m.encode_coords([inp["value"]])[0]
            for obj in phase.get("objects", []):
                fed = [m.encode_coords([obj["fed_coords"][0]])[0], m.encode_coords([obj["fed_coords"][1]])[0]]
                if "fed_size" in obj:
                    fed.append(m.encode_sizes([obj["fed_size"]])[0])
                inputs.update(dict(zip(obj["fed_positions"], fed)))
        cache = m.new_cache(image)
        start = cache.length
        if sorted(inputs) != list(range(start, start + len(inputs))):
            r.exact(g, "recorded positions contiguous", False, True)
            return
        with torch.no_grad():
            hidden = m.hidden(cache, torch.stack([inputs[p] for p in sorted(inputs)])[None])[0]
            logits = m.logits(hidden)
        at = lambda pos: pos - start  # noqa: E731
        for phase, prompt in zip(case["phases"], prompts):
            ph = phase["phase"]
            names = phase.get("tensors", {})
            r.close(g, f"{ph} prefill logits", logits[at(phase["prefill_last_pos"])], self.t(names["prefill_logits"]))
            for key, name in names.items():
                step = re.fullmatch(r"step(\d+)_raw_logits", key)
                if step:
                    r.close(g, f"{ph} {key}", logits[at(phase["steps"][int(step[1])]["pos"])], self.t(name))
            if "spatial_coord_emb" in names:
                r.close(g, "spatial coord embeddings", m.encode_coords(prompt.coords), self.t(names["spatial_coord_emb"]))
            if "spatial_size_emb" in names:
                r.close(g, "spatial size embeddings", m.encode_sizes(prompt.sizes), self.t(names["spatial_size_emb"]))
            if "steps" in phase:
                self.check_steps(g, phase, logits, at)
            for k, c in enumerate(phase.get("coordinates", [])):
                h = hidden[at(c["fed_at_pos"] - 1)]
                self.check_region(g, f"coord{k}", h, region.coord_logits(h, m.w.region), c["bin"], c["bin_gap12"], c.get("tensors", {}))
            if "objects" in phase:
                self.check_objects(g, phase, hidden, logits, at)

    def check_steps(self, g: str, phase: dict[str, Any], logits: torch.Tensor, at: Any) -> None:
        masks, worst, wrong = phase["logit_masks"], 0.0, []
        for step in phase["steps"]:
            row = logits[at(step["pos"])].clone()
            row[masks["prefill" if step["type"] == "prefill" else "decode"]] = float("-inf")
            ref = torch.tensor(step["top5_logits"])
            rel = float((row[step["top5_ids"]].double() - ref).abs().max() / ref.abs().max())
            worst = max(worst, rel)
            if int(row.argmax()) != step["argmax"] and step["gap12"] > 2 * REL_TOL * float(ref.abs().max()):
                wrong.append(step["step"])
        self.report.rows.append(Row(g, f"{phase['phase']} top-5 x{len(phase['steps'])} steps", worst <= REL_TOL, rel=worst, tol=f"rel {REL_TOL:g}"))
        self.report.exact(g, f"{phase['phase']} argmax per step", wrong, [])

    def check_region(self, g: str, name: str, hidden: torch.Tensor, logits: torch.Tensor, ref_bin: Any, gap: float,
                     tensors: dict[str, str]) -> None:
        if "hidden" in tensors:
            self.report.close(g, f"{name} hidden", hidden, self.t(tensors["hidden"]))
        if "logits" in tensors:
            self.report.close(g, f"{name} logits", logits, self.t(tensors["logits"]))
        ours = logits.argmax(-1).tolist()
        self.report.exact(g, f"{name} bin", ours, ref_bin, informational=gap <= 2 * REL_TOL * float(logits.abs().max()))

    def check_objects(self, g: str, phase: dict[str, Any], hidden: torch.Tensor, logits: torch.Tensor, at: Any) -> None:
        m, eos = self.m, self.m.cfg.tokenizer.eos_id
        worst, wrong = 0.0, []
        for d in phase["decisions"]:
            row, ref = logits[at(d["pos"])], torch.tensor(d["top5_logits"])
            worst = max(worst, float((row[d["top5_ids"]].double() - ref).abs().max() / ref.abs().max()))
            if (int(row.argmax()) == eos) != d["stop"] and abs(d["eos_minus_best_other"]) > 2 * REL_TOL * float(ref.abs().max()):
                wrong.append(d["pos"])
        self.report.rows.append(Row(g, f"continue/stop top-5 x{len(phase['decisions'])}", worst <= REL_TOL, rel=worst, tol=f"rel {REL_TOL:g}"))
        self.report.exact(g, "continue/stop decisions", wrong, [])
        tensors = phase.get("first_object_tensors", {})
        for k, obj in enumerate(phase["objects"]):
            fp = obj["fed_positions"]
            reads = [("x", fp[0] - 1, region.coord_logits, obj["x_bin"], obj["x_gap12"]),
                     ("y", fp[0], region.coord_logits, obj["y_bin"], obj["y_gap12"])]
            if "w_bin" in obj:
                reads.append(("size", fp[1], lambda h, w: region.size_logits(h, w).flatten(), [obj["w_bin"], obj["h_bin"]],
                              min(obj["w_gap12"], obj["h_gap12"])))
            for name, pos, decoder, ref_bin, gap in reads:
                h = hidden[at(pos)]
                out = decoder(h, m.w.region)
                t = {key: tensors[f"{name}_{key}"] for key in ("hidden", "logits") if k == 0 and f"{name}_{key}" in tensors}
                if name == "size":
                    self.check_region_size(g, f"obj{k} size", h, out, ref_bin, gap, t)
                else:
                    self.check_region(g, f"obj{k} {name}", h, out, ref_bin, gap, t)

    def check_region_size(self, g: str, name: str, h: torch.Tensor, out: torch.Tensor, ref_bins: list[int], gap: float,
                          tensors: dict[str, str]) -> None:
        if "hidden" in tensors:
            self.report.close(g, f"{name} hidden", h, self.t(tensors["hidden"]))
        if "logits" in tensors:
            self.report.close(g, f"{name} logits", out, self.t(tensors["logits"]))
        bins = out.view(2, -1).argmax(-1).tolist()
        self.report.exact(g, f"{name} bins", bins, ref_bins, informational=gap <= 2 * REL_TOL * float(out.abs().max()))

    def end_to_end(self, case: dict[str, Any], image: Any, info: bool) -> None:
        m, r, g, call = self.m, self.report, case["name"], case["call"]
        settings = dict(call.get("settings") or {}, **({"seed": call["seed"]} if "seed" in call else {}))
        s = skills.resolve_settings(settings, m.cfg.defaults)
        phases = case["phases"]
        near_tie = info or any(p.get("near_tie_steps") for p in phases)
        with torch.no_grad():
            if call["skill"] in ("caption", "query"):
                run, trace = simple.TextRun(), simple.TextRun()
                if call["skill"] == "caption":
                    list(simple.caption(m, image, call.get("length", "normal"), s, run=run))
                else:
                    list(simple.query(m, image, call["question"], s, call.get("spatial_refs"), call.get("reasoning", False), run, trace))
                runs = [trace, run] if call.get("reasoning") else [run]
                for phase, ours in zip(phases, runs):
                    stop = "max_tokens" if phase["stop_reason"] == "max_tokens" else "stop"
                    r.exact(g, f"{phase['phase']} greedy ids", [ours.ids, ours.stop_reason], [phase["generated_ids"], stop], near_tie)
            else:
                objs = simple.locate(m, image, call["skill"], call["object"], s, call.get("spatial_refs"))
                ours = [[o.x, o.y, *(o.size or ())] for o in objs]
                ref = [[o["x"], o["y"], *([o["w"], o["h"]] if "w" in o else [])] for o in phases[0]["objects"]]
                r.exact(g, "greedy objects", ours, ref, near_tie)
        kwargs = {k: call[k] for k in ("length", "question", "object", "reasoning", "spatial_refs") if k in call}
        for source, img in (("fixture crops", image), ("image file", call.get("image"))):
            if source == "image file" and img is not None:
                img = self.dir / self.meta["images"][img]["file"]
            result = getattr(self.vl, call["skill"])(img, settings=settings, **kwargs)
            informational = near_tie or (source == "image file" and img is not None and img_mod.RESIZE_BACKEND != "pyvips")
            r.exact(g, f"result ({source})", _same(result, case["result"]), True, informational,
                    "" if _same(result, case["result"]) else f"got {_short(result)}")


def main(directory: str, as_json: bool = False) -> int:
    report = Parity(directory).run()
    if as_json:
        print(json.dumps({"failures": len(report.failures), "rows": [r.__dict__ for r in report.rows]}, indent=1))
    else:
        print(report.table())
    return 1 if report.failures else 0
