"""Parity against golden outputs of the reference implementation (`python -m moonbase parity DIR`).

DIR holds `model.safetensors`, `config.json`, `tokenizer.json`, `images/`, `crops/`, `expected.json` and
`expected.safetensors` (format described in the fixture's README). Every recorded value is recomputed in
float32: crops, vision features, image embeddings, prefix K/V, prefill logits, teacher-forced top-5 logits
along the recorded path, region-decoder inputs and outputs, then greedy ids and returned results end to end.
Model numerics are checked on the fixture's own crop PNGs so that resizing is tested separately.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from .. import image as img_mod
from .. import simple
from ..api import VL
from ..hub import load_dir
from ..image import load_image, normalize, overlap_crops, tiling_for
from ..model import region, vision
from ..model.rope import k_to_interleaved
from ..model.text import KVCache
from ..skills import Prompt, SkillRequest
from .report import Report, Row, same_result, short_json

# Tolerances from the fixture README ("Suggested tolerances", float32 column).
REL_TOL = 1e-4  # vision outputs, pooled, img_emb, K/V, logits, region logits (and hidden states)
CROP_ABS_TOL = 2.4e-7  # normalized crops: exact up to one ulp
STATS_ABS_TOL = 1e-6  # crop mean/std, recomputed in float64


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
        canvas = [t * cfg.window_px + 2 * cfg.margin_px for t in tiling]
        grid = [t * (cfg.grid - 2 * cfg.overlap_margin) + 2 * cfg.overlap_margin for t in tiling] + [cfg.enc_dim]
        got = [list(tiling), 1 + tiling[0] * tiling[1], canvas, grid]
        want = [rec["tiling"], rec["n_crops"], rec["resized_canvas_hw"], rec["reconstructed_grid_shape"]]
        r.exact(g, "tiling, n_crops, canvas, grid", got, want)
        ref_px = np.stack([np.asarray(Image.open(self.dir / f).convert("RGB")) for f in rec["crop_files"]])
        own = overlap_crops(load_image(self.dir / rec["file"]), cfg)
        diff = int(np.abs(own.pixels.astype(int) - ref_px.astype(int)).max()) if own.pixels.shape == ref_px.shape else -1
        backend, note = img_mod.RESIZE_BACKEND, "" if diff == 0 else f"max pixel difference {diff} (-1: shape)"
        r.exact(g, f"own crops ({backend}) == crop PNGs", diff, 0, informational=backend != "pyvips", note=note)
        x = normalize(ref_px)
        stats = [x.double().mean((1, 2, 3)).tolist(), x.double().std((1, 2, 3), unbiased=False).tolist()]
        r.close(g, "crop stats (mean, std)", stats, [rec["crop_mean"], rec["crop_std"]], None, STATS_ABS_TOL)
        feats = vision.encode_crops(x, m.w.vision, cfg)
        local = feats[1:].reshape(-1, cfg.grid, cfg.grid, cfg.enc_dim)
        pooled = vision.pool_grid(vision.reconstruct(local, tiling, cfg.overlap_margin), cfg.grid)
        img_emb = vision.project(feats[0], pooled, m.w.vision)
        enc = m.prefill_image(img_emb)
        self.encoded[i] = enc
        routes: list[torch.Tensor] = []
        if m.cfg.text.moe is not None:  # the prefix again, to read its routing (prefill_image stops at the K/V)
            bos = m.embed_ids([m.cfg.tokenizer.bos_id])
            m.hidden(KVCache(m.cfg.text, 1, m.device, m.dtype, m.cfg.prefix_len), torch.cat([bos, img_emb])[None], routes=routes)
        last = len(enc.kv) - 1
        ours = {"crop_global": x[0], "crop_local0": x[1], "vis_enc_global": feats[0], "vis_enc_local0": feats[1]}
        ours |= {"pooled_local": pooled, "img_emb": img_emb}
        for key, name in rec["tensors"].items():
            kv = re.fullmatch(r"kv_l(\d+|last)_([kv])", key)
            if kv:
                layer = last if kv[1] == "last" else int(kv[1])
                k_or_v = enc.kv[layer][0 if kv[2] == "k" else 1]
                value = k_to_interleaved(k_or_v, m.cfg.text.rotary_dim) if kv[2] == "k" else k_or_v
            elif key in ours:
                value = ours[key]
            elif moe := re.fullmatch(r"moe_l(\d+)_(router_logits|topk_ids|topk_weights)", key):
                if moe[2] == "router_logits":
                    self.check_routing(g, f"layer {moe[1]} prefix", routes[int(moe[1]) - m.cfg.text.moe.start_layer][0], name)
                continue
            else:
                r.exact(g, key, "recomputed", "unknown tensor key")
                continue
            crop = key.startswith("crop_")
            r.close(g, key, value, self.t(name), None if crop else REL_TOL, CROP_ABS_TOL if crop else None)

    def check_routing(self, g: str, what: str, logits: torch.Tensor, name: str) -> None:
        """Router logits (T, E) against `name`; the chosen sets exactly (routing is discrete; the order inside a
        set is not protected by the fixture) and their weights by expert id, where the fixture records them."""
        self.report.close(g, f"{what} router logits", logits, self.t(name))
        prefix = name.removesuffix("router_logits")
        if prefix + "topk_ids" in self.tensors:
            self.compare_routes(g, what, logits, self.t(prefix + "topk_ids").tolist(), self.t(prefix + "topk_weights").tolist())

    def compare_routes(self, g: str, what: str, logits: torch.Tensor, ids: list[list[int]], weights: list[list[float]]) -> None:
        k = self.m.cfg.text.moe.experts_per_token
        top = logits.topk(k, dim=-1)
        ours = torch.softmax(top.values.double(), dim=-1).tolist()
        wrong = [j for j, row in enumerate(ids) if sorted(row) != sorted(top.indices[j].tolist())]
        err = max(
            (
                abs(dict(zip(top.indices[j].tolist(), ours[j], strict=True))[e] - w)
                for j in range(len(ids))
                if j not in wrong
                for e, w in zip(ids[j], weights[j], strict=True)
            ),
            default=0.0,
        )
        self.report.exact(g, f"{what} expert sets x{len(ids)}", wrong, [])
        self.report.rows.append(Row(g, f"{what} expert weights", err <= REL_TOL, max_abs=err, tol=f"abs {REL_TOL:g}"))

    # --- cases --------------------------------------------------------------------------------------
    @staticmethod
    def request(call: dict[str, Any], image: Any = None) -> SkillRequest:
        settings = dict(call.get("settings") or {}, **({"seed": call["seed"]} if "seed" in call else {}))
        args = {k: call[k] for k in ("length", "question", "object", "reasoning", "spatial_refs") if k in call}
        return SkillRequest(call["skill"], image, settings=settings, **args)

    def prompts(self, call: dict[str, Any], text_only: bool) -> list[Prompt]:
        tok, req = self.m.cfg.tokenizer, self.request(call)
        p = req.skill.prompt(req, self.m.tokenizer)
        p = Prompt((tok.bos_id,)) + p if text_only else p
        return [p, Prompt((tok.answer_id,))] if req.reasoning else [p]

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
        for phase, prompt in zip(case["phases"], prompts, strict=True):
            r.exact(g, f"{phase['phase']} prompt ids", list(prompt.ids), phase["prompt_ids"])
            emb = m.embed_prompt(phase["prompt_ids"], prompt.coords, prompt.sizes)
            inputs.update({phase["start_pos"] + j: e for j, e in enumerate(emb)})
            for step in phase.get("steps", []):
                if inp := step.get("input"):
                    encode = {"token": m.embed_ids, "coord": m.encode_coords, "size": m.encode_sizes}[inp["type"]]
                    inputs[step["pos"]] = encode([inp["id"] if inp["type"] == "token" else inp["value"]])[0]
            for obj in phase.get("objects", []):
                fed = [m.encode_coords([obj["fed_coords"][0]])[0], m.encode_coords([obj["fed_coords"][1]])[0]]
                if "fed_size" in obj:
                    fed.append(m.encode_sizes([obj["fed_size"]])[0])
                inputs.update(dict(zip(obj["fed_positions"], fed, strict=True)))
        cache = m.new_cache(image)
        start = cache.length
        if sorted(inputs) != list(range(start, start + len(inputs))):
            r.exact(g, "recorded positions contiguous", False, True)
            return
        routes: list[torch.Tensor] = []
        with torch.no_grad():
            hidden = m.hidden(cache, torch.stack([inputs[p] for p in sorted(inputs)])[None], routes=routes)[0]
            logits = m.logits(hidden)
        at = lambda pos: pos - start  # noqa: E731
        if routes:
            self.check_case_routing(g, case, [r[0] for r in routes], at)
        for phase, prompt in zip(case["phases"], prompts, strict=True):
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
                out = region.coord_logits(h, m.w.region)
                self.check_region(g, f"coord{k}", h, out, c["bin"], c["bin_gap12"], c.get("tensors", {}))
            for c in phase.get("region_decodes", []):  # segment: the bbox's coordinates and size
                h = hidden[at(c["fed_at_pos"] - 1)]
                size = c["kind"] == "size"
                out = (region.size_logits if size else region.coord_logits)(h, m.w.region)
                ref, gap = ([c["w_bin"], c["h_bin"]], min(c["w_gap12"], c["h_gap12"])) if size else (c["bin"], c["bin_gap12"])
                self.check_region(g, c["name"], h, out, ref, gap, c.get("tensors", {}))
            if "objects" in phase:
                self.check_objects(g, phase, hidden, logits, at)

    def check_case_routing(self, g: str, case: dict[str, Any], routes: list[torch.Tensor], at: Any) -> None:
        """Every prompt position's routing (`moe_prefill`, router logits) and the expert sets of every recorded step
        and object decision (`moe_topk_ids`, at the position whose output the step reads)."""
        first = self.m.cfg.text.moe.start_layer
        for phase in case["phases"]:
            ph, (lo, hi) = phase["phase"], phase["moe_prefill"]["positions"]
            for layer, rec in phase["moe_prefill"]["layers"].items():
                logits = routes[int(layer) - first][at(lo) : at(hi) + 1]
                self.compare_routes(g, f"{ph} prompt layer {layer}", logits, rec["topk_ids"], rec["topk_weights"])
                if name := phase.get("tensors", {}).get(f"moe_l{layer}_router_logits"):
                    self.report.close(g, f"{ph} prompt layer {layer} router logits", logits, self.t(name))
            wrong = []
            for rec in phase.get("steps", []) + phase.get("decisions", []):
                for layer, ids in rec.get("moe_topk_ids", {}).items():
                    ours = routes[int(layer) - first][at(rec["pos"])].topk(len(ids)).indices.tolist()
                    if sorted(ours) != sorted(ids):
                        wrong.append((rec["pos"], int(layer)))
            self.report.exact(g, f"{ph} step expert sets", wrong, [])

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
        self.report.rows.append(
            Row(g, f"{phase['phase']} top-5 x{len(phase['steps'])} steps", worst <= REL_TOL, rel=worst, tol=f"rel {REL_TOL:g}")
        )
        self.report.exact(g, f"{phase['phase']} argmax per step", wrong, [])

    def check_region(
        self, g: str, name: str, hidden: torch.Tensor, logits: torch.Tensor, ref: Any, gap: float, tensors: dict[str, str]
    ) -> None:
        """Region-decoder input and output tensors (when recorded) and the decoded bin(s): the argmax over the last
        dimension of the coordinate logits (bins) or the size logits (2, bins)."""
        for key, value in (("hidden", hidden), ("logits", logits)):
            if key in tensors:
                self.report.close(g, f"{name} {key}", value, self.t(tensors[key]))
        ours = logits.argmax(-1).tolist()
        self.report.exact(g, f"{name} bin", ours, ref, informational=gap <= 2 * REL_TOL * float(logits.abs().max()))

    def check_objects(self, g: str, phase: dict[str, Any], hidden: torch.Tensor, logits: torch.Tensor, at: Any) -> None:
        m, eos = self.m, self.m.cfg.tokenizer.eos_id
        worst, wrong = 0.0, []
        for d in phase["decisions"]:
            row, ref = logits[at(d["pos"])], torch.tensor(d["top5_logits"])
            worst = max(worst, float((row[d["top5_ids"]].double() - ref).abs().max() / ref.abs().max()))
            if ids := d.get("restricted_ids"):  # Moondream 3 after an object: only the coord and eos logits compete
                stop, margin = ids[int(row[ids].argmax())] == eos, d["coord_minus_eos"]
            else:
                stop, margin = int(row.argmax()) == eos, d["eos_minus_best_other"]
            if stop != d["stop"] and abs(margin) > 2 * REL_TOL * float(ref.abs().max()):
                wrong.append(d["pos"])
        self.report.rows.append(
            Row(g, f"continue/stop top-5 x{len(phase['decisions'])}", worst <= REL_TOL, rel=worst, tol=f"rel {REL_TOL:g}")
        )
        self.report.exact(g, "continue/stop decisions", wrong, [])
        tensors = phase.get("first_object_tensors", {})
        for k, obj in enumerate(phase["objects"]):
            fp = obj["fed_positions"]
            reads = [("x", fp[0] - 1, obj["x_bin"], obj["x_gap12"]), ("y", fp[0], obj["y_bin"], obj["y_gap12"])]
            if "w_bin" in obj:
                reads.append(("size", fp[1], [obj["w_bin"], obj["h_bin"]], min(obj["w_gap12"], obj["h_gap12"])))
            for name, pos, ref_bin, gap in reads:
                h = hidden[at(pos)]
                out = (region.size_logits if name == "size" else region.coord_logits)(h, m.w.region)
                t = {key: tensors[f"{name}_{key}"] for key in ("hidden", "logits") if k == 0 and f"{name}_{key}" in tensors}
                self.check_region(g, f"obj{k} {name}", h, out, ref_bin, gap, t)

    def end_to_end(self, case: dict[str, Any], image: Any, info: bool) -> None:
        m, r, g, call = self.m, self.report, case["name"], case["call"]
        req = self.request(call)
        phases = case["phases"]
        near_tie = info or any(p.get("near_tie_steps") for p in phases)
        out = simple.run(m, image, req)
        if out.text is not None:
            runs = [out.trace, out.text] if req.reasoning else [out.text]
            for phase, ours in zip(phases, runs, strict=True):
                stop = "max_tokens" if phase["stop_reason"] == "max_tokens" else "stop"
                got, want = [ours.ids, ours.stop_reason.value], [phase["generated_ids"], stop]
                r.exact(g, f"{phase['phase']} greedy ids", got, want, near_tie)
        else:
            ours = [[o.x, o.y, *(o.size or ())] for o in out.objects]
            ref = [[o["x"], o["y"], *([o["w"], o["h"]] if "w" in o else [])] for o in phases[0]["objects"]]
            r.exact(g, "greedy objects", ours, ref, near_tie)
        for source, img in (("fixture crops", image), ("image file", call.get("image"))):
            if source == "image file" and img is not None:
                img = self.dir / self.meta["images"][img]["file"]
            result = req.skill.reference(
                self.vl.wait([self.vl.submit(self.vl.prepare(dataclasses.replace(req, image=img)))])[0].output, m.tokenizer
            )
            informational = near_tie or (source == "image file" and img is not None and img_mod.RESIZE_BACKEND != "pyvips")
            same = same_result(result, case["result"])
            r.exact(g, f"result ({source})", same, True, informational, "" if same else f"got {short_json(result)}")


def main(directory: str, as_json: bool = False) -> int:
    report = Parity(directory).run()
    if as_json:
        print(json.dumps({"failures": len(report.failures), "rows": [r.__dict__ for r in report.rows]}, indent=1))
    else:
        print(report.table())
    return 1 if report.failures else 0
