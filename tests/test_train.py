import math

import torch

from moonbase.data.scenes import scene_example
from moonbase.data.tasks import Example, Task
from moonbase.model import region
from moonbase.model.text import decoder
from moonbase.train.batch import IGNORE, make_batch, render_task, segment_mask
from moonbase.train.losses import attention_loss, embed_inputs, image_probe, losses, vision_losses


def test_detect_labels_follow_the_inference_loop(tiny):
    cfg, tok = tiny.cfg, tiny.cfg.tokenizer
    task = Task("detect", "circle", boxes=((0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.7, 0.9)))
    seg = render_task(task, tiny.tokenizer, cfg)
    n = len(seg) - 6  # prompt length: two objects add x, y, size each
    assert seg.ids[:n] == list(tiny.tokenizer.cfg.detect_prefix) + tiny.tokenizer.encode(" circle") + [tok.answer_id]
    # decision "another object" and x are read at the last prompt position, y at x, size at y
    assert seg.token_label[n - 1] == tok.coord_id and seg.coord_label[n - 1] == region.coord_to_bin(0.2, cfg.region)
    assert seg.coord_label[n] == region.coord_to_bin(0.3, cfg.region)
    assert seg.size_label[n + 1] == (region.size_to_bin(0.2, cfg.region), region.size_to_bin(0.2, cfg.region))
    assert seg.token_label[n + 2] == tok.coord_id and seg.token_label[-1] == tok.eos_id
    assert seg.coord_in[n] == float(region.coord_from_bin(torch.tensor(seg.coord_label[n - 1]), cfg.region))
    assert seg.size_in[n + 2] is not None and seg.token_label[n] == IGNORE


def test_text_labels_are_the_next_tokens(tiny):
    seg = render_task(Task("query", "What?", "red"), tiny.tokenizer, tiny.cfg)
    answer = tiny.tokenizer.encode("red")
    assert seg.token_label[-1 - len(answer) + 1 :] == answer[1:] + [0] or seg.token_label[-len(answer) - 1 :][-1] == 0
    labelled = [t for t in seg.token_label if t != IGNORE]
    assert labelled == answer + [tiny.cfg.tokenizer.eos_id]


def test_packed_rows_equal_separate_sequences(tiny):
    """Several tasks behind one image prefix give the same hidden states as the inference path, one task at a time."""
    ex = scene_example(4)
    ex = Example(ex.image, ex.tasks[:2] + ex.tasks[3:4], ex.source)
    b = make_batch([ex], tiny.tokenizer, tiny.cfg)
    with torch.no_grad():
        x = embed_inputs(tiny, b)
        packed = decoder(x, tiny.w.text, tiny.cfg.text, tiny.rope, b.pos, segment_mask(b.seg))[0]
        image = tiny.prefill_image(x[0, 1 : tiny.cfg.prefix_len])
        for k in range(1, len(ex.tasks) + 1):
            cols = (b.seg[0] == k).nonzero().squeeze(1)
            alone = tiny.hidden(tiny.new_cache(image), x[:, cols])[0]
            assert torch.allclose(packed[cols], alone, atol=1e-5)


def test_loss_falls_on_a_small_overfit_set():
    from moonbase.hub import tiny_random

    m = tiny_random(seed=2)
    m.w.requires_grad_(True)
    opt = torch.optim.AdamW(m.w.parameters(), lr=3e-3)
    b = make_batch([scene_example(i) for i in range(4)], m.tokenizer, m.cfg)
    first = None
    for _ in range(40):
        parts = losses(m, b, label_sigma=1.0)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        first = first if first is not None else {k: float(v.detach()) for k, v in parts.items()}
    last = {k: float(v.detach()) for k, v in parts.items()}
    assert last["token"] < 0.5 * first["token"]
    assert last["coord"] < first["coord"] - 1.0 and last["size"] < first["size"] - 1.0


def test_image_token_probe_labels_and_gradient(tiny):
    """Tokens under an object carry its kind and colour, the rest none; the probe loss falls and trains only the vision side."""
    from moonbase.data.shapes import COLORS, SHAPES

    ex = scene_example(7)
    b = make_batch([ex], tiny.tokenizer, tiny.cfg)
    grid = tiny.cfg.vision.grid
    for kind, color, (x0, y0, x1, y1) in ex.regions:
        centre = min(grid - 1, int((y0 + y1) / 2 * grid)) * grid + min(grid - 1, int((x0 + x1) / 2 * grid))
        assert b.patch_labels[0, centre].tolist() == [kind + 1, color + 1]
    assert (b.patch_labels[0, :, 0] == 0).any() and ((b.patch_labels[0, :, 0] == 0) == (b.patch_labels[0, :, 1] == 0)).all()
    assert all(kind < len(SHAPES) and color < len(COLORS) for kind, color, _ in ex.regions)

    from moonbase.hub import tiny_random

    m = tiny_random(seed=3)
    m.w.requires_grad_(True)
    probe = image_probe(m.cfg.text.dim)
    b = make_batch([scene_example(i) for i in range(4)], m.tokenizer, m.cfg)
    opt = torch.optim.AdamW([*m.w.parameters(), *probe.parameters()], lr=3e-3)
    history = []
    for _ in range(30):
        parts = vision_losses(m, b, probe)
        opt.zero_grad()
        parts["loss"].backward()
        history.append(float(parts["probe"].detach()))
        opt.step()
    assert history[-1] < 0.5 * history[0]
    with torch.no_grad():  # the vision phase's loss is the full model's probe term, without the decoder
        assert torch.allclose(vision_losses(m, b, probe)["loss"], losses(m, b, probe=probe)["probe"], atol=1e-5)
    text_grad = m.w.text.blocks[0]["attn"]["qkv"].weight.grad
    assert text_grad is None or not text_grad.any()


def test_position_probe_targets_each_tokens_own_row_and_column(tiny):
    """With a grid, the probe's loss also asks each image token for its own row and column, row-major."""
    from moonbase.train.losses import COLOURS, KINDS, _probe_loss

    b = make_batch([scene_example(3)], tiny.tokenizer, tiny.cfg)
    grid, cells = tiny.cfg.vision.grid, b.patch_labels.shape[1]
    assert image_probe(8, grid).out_features == KINDS + COLOURS + 2 * grid
    content = 20.0 * torch.nn.functional.one_hot(b.patch_labels[0, :, 0], KINDS).float()
    content = torch.cat([content, 20.0 * torch.nn.functional.one_hot(b.patch_labels[0, :, 1], COLOURS).float()], -1)
    cell = torch.arange(cells)
    right = 20.0 * torch.cat(
        [torch.nn.functional.one_hot(cell // grid, grid), torch.nn.functional.one_hot(cell % grid, grid)], -1
    )
    transposed = 20.0 * torch.cat(
        [torch.nn.functional.one_hot(cell % grid, grid), torch.nn.functional.one_hot(cell // grid, grid)], -1
    )
    assert float(_probe_loss(content[None], b)) < 1e-6  # no position outputs: kind and colour alone
    assert float(_probe_loss(torch.cat([content, right], -1)[None], b)) < 1e-6
    assert float(_probe_loss(torch.cat([content, transposed], -1)[None], b)) > 10.0


def test_attention_loss_is_minus_log_of_the_attention_mass_on_the_region():
    r, t, p = 2, 6, 2  # image tokens sit at positions 1 and 2
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(r, t, t)
    attend = torch.zeros(r, t, p, dtype=torch.bool)
    attend[0, 3, 0] = True  # row 0 scores one position, row 1 two: the rows are padded differently
    attend[1, 4] = True
    attend[1, 5, 1] = True
    q = torch.zeros(r, 1, t, 4, requires_grad=True)  # zero queries: uniform attention over the visible keys
    k = torch.zeros(r, 1, t, 4)
    first_layer = (torch.randn(r, 1, t, 4), k)  # never scored
    out = attention_loss([first_layer, (q, k)], attend, mask, heads=1)
    expected = torch.tensor([-math.log(1 / 4), -math.log(2 / 5), -math.log(1 / 6)])
    assert len(out) == 1 and torch.allclose(out[0], expected)
    k = torch.randn(r, 1, t, 4)  # gradients reach exactly the scored queries, and stay finite
    attention_loss([first_layer, (q, k)], attend, mask, heads=1)[0].sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[1, 0, 4].abs().sum() > 0 and q.grad[0, 0, 4].abs().sum() == 0
    assert attention_loss([first_layer, (q, k)], torch.zeros(r, t, p, dtype=torch.bool), mask) == []
