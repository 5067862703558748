"""Log lines as JSON objects (`SOFTSERVE_LOG_FORMAT=json`), one per line, for log pipelines: `time`, `level`,
`logger`, `message`, and an access line's fields (request_id, route, status, tokens, ...) as keys of their own."""
from __future__ import annotations

import json
import logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        line |= getattr(record, "fields", {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def use_json_lines() -> None:
    """Every handler of the root logger (the CLI's or ours) writes JSON lines."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())
