"""What a finished request is counted as: its usage (token counts), TGI's timing headers, and its metrics and
access-log tokens."""
from __future__ import annotations

from fastapi import Request

from app.api.schemas import Usage
from app.engine.sequence import Output, Sequence
from app.engine.task_prompt import TaskPrompt
from app.metrics import Metrics
from prompt_store.format import BASE_MODEL, Task


def usage(outs: list[Output], first_of_prompt: list[bool] | None = None) -> Usage:
    """Token counts of a response. With copies of one prompt (n > 1), the prompt's tokens count once,
    as OpenAI counts them: first_of_prompt marks the outputs whose prompt is counted."""
    counted = outs if first_of_prompt is None else [o for o, first in zip(outs, first_of_prompt) if first]
    prompt = sum(o.prompt_tokens for o in counted)
    completion = sum(o.completion_tokens for o in outs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def timing_headers(seqs: list[Sequence], outs: list[Output], end: float) -> dict[str, str]:
    """TGI's headers, in milliseconds; for a batch, queue time is the longest wait and inference time runs
    from the first admission to the result."""
    arrival = min(s.arrival for s in seqs)
    generated = sum(o.completion_tokens for o in outs)
    headers = {"x-total-time": _ms(end - arrival), "x-generated-tokens": str(generated),
               "x-prompt-tokens": str(sum(o.prompt_tokens for o in outs))}
    admitted = [s.scheduled_time for s in seqs]
    if all(a is not None for a in admitted):
        headers["x-queue-time"] = _ms(max(a - s.arrival for a, s in zip(admitted, seqs)))
        inference = end - min(admitted)
    else:
        inference = end - arrival
    headers["x-inference-time"] = _ms(inference)
    if generated:
        headers["x-time-per-token"] = _ms(inference / generated)
    return headers


def _ms(seconds: float) -> str:
    return str(max(0, round(seconds * 1000)))


def record(request: Request, route: str, seq: Sequence, out: Output, end: float) -> None:
    """A finished sequence's metrics, and its tokens added to the request's access-log line."""
    metrics: Metrics = request.app.state.metrics
    state = request.state
    state.prompt_tokens = getattr(state, "prompt_tokens", 0) + out.prompt_tokens
    state.completion_tokens = getattr(state, "completion_tokens", 0) + out.completion_tokens
    prompt = seq.prompt.name if seq.prompt is not None else BASE_MODEL
    if seq.prompt is not None and seq.task == Task.GENERATE:
        metrics.version_finish_reasons.labels(prompt, str(seq.prompt.version), out.finish_reason).inc()
    metrics.prompt_tokens.labels(route, prompt).inc(out.prompt_tokens)
    metrics.e2e_latency.labels(prompt).observe(end - seq.arrival)
    if out.completion_tokens:
        metrics.generated_tokens.labels(route, prompt).inc(out.completion_tokens)
        metrics.tokens_per_request.labels(route).observe(out.completion_tokens)
    if seq.first_token_time is not None:
        metrics.time_to_first_token.labels(prompt).observe(seq.first_token_time - seq.arrival)
        if out.completion_tokens > 1:
            metrics.time_per_output_token.labels(prompt).observe(
                (end - seq.first_token_time) / (out.completion_tokens - 1))
    admitted = seq.scheduled_time
    if admitted is not None:
        metrics.queue_time.labels(route).observe(admitted - seq.arrival)
        metrics.inference_time.labels(route).observe(end - admitted)
    metrics.vllm.finished(request.app.state.services.model_id, seq, out, end, admitted)


def record_label(request: Request, prompt: TaskPrompt, label: str) -> None:
    """A classify answer, counted per prompt version (a canary's answers compared with the version it may
    replace)."""
    metrics: Metrics = request.app.state.metrics
    metrics.version_labels.labels(prompt.name, str(prompt.version), label).inc()
