"""softserve. `from app import LLM` for the engine without the server (app/llm.py)."""


def __getattr__(name: str):
    if name == "LLM":  # imported on first use: `import app.config` stays light
        from app.llm import LLM

        return LLM
    raise AttributeError(f"module 'app' has no attribute {name!r}")
