"""SOFTSERVE_LOG_FORMAT=json: every log line a JSON object, the access line's fields as keys."""
from __future__ import annotations

import io
import json
import logging

from fastapi.testclient import TestClient

from app.config import Settings
from app.server import create_app


def test_json_access_lines(tmp_path):
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    saved = [(h, h.formatter) for h in root.handlers]
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        app = create_app(Settings(log_format="json", example_prompts=False, prompt_store=tmp_path))
        TestClient(app).get("/health", headers={"x-request-id": "json-probe"})  # (no lifespan: no model load)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for h, formatter in saved:
            h.setFormatter(formatter)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = next(line for line in lines if line.get("request_id") == "json-probe")
    assert access["logger"] == "softserve.access" and access["route"] == "/health" and access["status"] == 503
    assert isinstance(access["status"], int) and isinstance(access["duration_ms"], float)
    assert access["message"].startswith("request_id=json-probe ")
