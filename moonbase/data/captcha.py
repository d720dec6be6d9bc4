"""Digit captchas rendered with the `captcha` package, made deterministic under a seed.

The package draws all its randomness from the `secrets` module; while rendering we give it a stand-in
bound to a seeded `random.Random`, under a lock because the substitution is module-global.
"""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import numpy as np

from .tasks import Example, Task

_LOCK = threading.Lock()
QUESTION = "What does the captcha say?"


def render_captcha(text: str, seed: int, width: int = 160, height: int = 60) -> np.ndarray:
    from captcha import image as captcha_image

    rng = random.Random(seed)
    fake = SimpleNamespace(randbelow=rng.randrange, randbits=rng.getrandbits, choice=rng.choice)
    with _LOCK:
        real = captcha_image.secrets
        captcha_image.secrets = fake
        try:
            im = captcha_image.ImageCaptcha(width=width, height=height).generate_image(text)
        finally:
            captcha_image.secrets = real
    return np.asarray(im.convert("RGB"))


def captcha_example(seed: int) -> Example:
    rng = random.Random(f"captcha-{seed}")
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    image = render_captcha(digits, seed)
    return Example(image, (Task("query", QUESTION, digits, kind="captcha"),), "captcha")
