"""Schemathesis hooks for tests/api/test_openapi.py (loaded with SCHEMATHESIS_HOOKS=tests.api.fuzz_hooks).

A condition image is base64 of a PNG/JPEG: no JSON Schema can say "decodes as an image", so a schema-valid random
string gets the documented 400. Schema-valid (positive) cases therefore carry a real image where the generator drew
one; negative cases are left as drawn, so an image that breaks the schema is still sent as it is."""

from __future__ import annotations

import base64
import io

import schemathesis
from PIL import Image
from schemathesis import GenerationMode


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 60, 20)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG = _png()


@schemathesis.hook
def map_case(context, case):
    meta = getattr(case, "meta", None)
    positive = meta is not None and meta.generation.mode == GenerationMode.POSITIVE
    if positive and isinstance(case.body, dict) and isinstance(case.body.get("image"), str):
        case.body["image"] = PNG
    return case
