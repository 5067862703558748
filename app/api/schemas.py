"""Request bodies. Field limits live here, so a bad request is a 400 whose `param` names the field, and no
client value reaches the engine unchecked."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from app.api.sampling_fields import MaxTokens, SamplingFields
from prompt_store.format import BASE_MODEL, Kind, Task


# ---- task endpoints ---------------------------------------------------------------------------------

Text = Annotated[str, Field(min_length=1, description="one input text")]


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field this route does not take is a 400, never ignored
    prompt: str = Field(description="name of a registered task prompt (GET /v1/prompts)")
    inputs: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="one text or a list of texts (SOFTSERVE_MAX_INPUTS_PER_REQUEST at most); all are submitted "
                    "at once, so the engine batches them")
    user: str | None = Field(None, max_length=256, description="an end-user id, as OpenAI's `user`: under a "
                             "traffic split, every request of one user gets the same version")

    @property
    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class GenerateRequest(SamplingFields, TaskRequest):
    prompt: str = Field(BASE_MODEL, description="name of a generate prompt, or 'base' for the bare model")
    max_tokens: MaxTokens = Field(16, description="tokens to generate at most")
    chat: bool = Field(False, description="render each input as one user message with the chat template")
    model_config = ConfigDict(json_schema_extra={"example": {"prompt": BASE_MODEL, "inputs": ["Hello", "Paris is"],
                                                             "max_tokens": 8, "temperature": 0}})


class TagRequest(TaskRequest):
    return_probs: bool = Field(False, description="also return every label's probability for each token")
    model_config = ConfigDict(json_schema_extra={"example": {"prompt": "ner", "inputs": "Ada Lovelace lived in London."}})


class ClassifyRequest(TaskRequest):
    model_config = ConfigDict(json_schema_extra={"example": {"prompt": "spam", "inputs": ["Win a free cruise now!"]}})


class Usage(BaseModel):
    prompt_tokens: int = Field(description="each prompt counted once, however many choices (n) it has")
    completion_tokens: int
    total_tokens: int


class GenerateResult(BaseModel):
    index: int
    text: str = Field(description="the generated text")
    finish_reason: str = Field(description="'stop' (end of sequence or a stop string) or 'length' (max_tokens)")
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    prompt: str
    results: list[GenerateResult] = Field(description="one per input, in input order")
    usage: Usage


class TaggedToken(BaseModel):
    text: str = Field(description="the characters of the input this token covers")
    start: int = Field(description="character offset where the token starts")
    end: int = Field(description="character offset where the token ends (exclusive)")
    label: str = Field(description="the most probable label")
    score: float = Field(description="its probability")
    probs: dict[str, float] | None = Field(None, exclude_if=lambda probs: probs is None,
                                           description="every label's probability (only with return_probs)")


class Entity(BaseModel):
    text: str
    label: str = Field(description="entity type: the tag without its B-/I- prefix")
    start: int
    end: int
    score: float = Field(description="mean of the entity's token scores")


class TagResult(BaseModel):
    index: int
    tokens: list[TaggedToken]
    entities: list[Entity] = Field(description="consecutive tokens merged by their BIO/IOB tags")


class TagResponse(BaseModel):
    prompt: str
    labels: list[str]
    results: list[TagResult]
    usage: Usage


class ClassifyResult(BaseModel):
    index: int
    label: str = Field(description="the most probable label")
    score: float = Field(description="its probability")
    probs: dict[str, float] = Field(description="every label's probability")


class ClassifyResponse(BaseModel):
    prompt: str
    labels: list[str]
    results: list[ClassifyResult]
    usage: Usage


# ---- prompts -----------------------------------------------------------------------------------------

class PromptVersion(BaseModel):
    version: int
    created_at: str
    size_bytes: int
    digest: str = Field(description="sha256 of the version's file")


class PromptTraffic(BaseModel):
    versions: dict[str, int] = Field(description="version -> percent of the requests naming the bare name")
    updated_at: str


class PromptResponse(BaseModel):
    """A stored prompt as the API shows it: the store's PromptInfo, whether this replica serves it, its history."""
    name: str
    kind: Kind = Field(description="'prompt' (shallow: prompt tuning) or 'prefix' (deep: prefix tuning / P-Tuning v2)")
    task: Task = Field(description="'generate', 'tag' or 'classify'")
    labels: list[str]
    num_virtual_tokens: int
    description: str
    source: str = Field(description="where it came from, e.g. 'softserve-train' or 'peft:PROMPT_TUNING'")
    version: int = Field(description="the current (newest) version")
    versions: list[int] = Field(description="every stored version")
    size_bytes: int
    created_at: str
    digest: str = Field(description="sha256 of the current version's file: replicas serving the same name, "
                                    "version and digest serve the same prompt")
    serving: bool = Field(description="whether this replica's engine serves the current version")
    history: list[PromptVersion] | None = Field(None, description="each stored version (GET /v1/prompts/{name})")
    traffic: PromptTraffic | None = Field(None, description="the split of requests between versions, if any "
                                                           "(PUT /v1/prompts/{name}/traffic)")


class TrafficSplitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"versions": {"3": 90, "4": 10}}})
    versions: dict[str, StrictInt] = Field(description="stored version -> whole percent of the requests naming "
                                                       "the bare prompt name, summing to 100")


class TrafficSplitResponse(PromptTraffic):
    name: str


class DeletedTrafficSplit(BaseModel):
    name: str
    object: Literal["traffic_split"] = "traffic_split"
    deleted: bool


class PromptList(BaseModel):
    object: Literal["list"] = "list"
    base: dict = Field(description="the base model identity prompts must match (architecture, sizes, fingerprint)")
    data: list[PromptResponse]


class DeletedPrompt(BaseModel):
    id: str
    object: Literal["prompt"] = "prompt"
    deleted: bool


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault, e.g. 'temperature' or 'messages.0.role'")
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """OpenAPI documentation of a route's error responses."""
    what = {400: "a field breaks the schema (`param` names it), not JSON, too many inputs or tokens, too long for "
                 "the context", 401: "missing or invalid token",
            403: "not allowed", 404: "unknown prompt, model or version",
            409: "another writer stored this prompt name at the same moment; retry",
            413: "body over SOFTSERVE_MAX_REQUEST_MB (inference) or SOFTSERVE_MAX_UPLOAD_MB (uploads)",
            422: "wrong task type; a refused prompt file or adapter",
            429: "the queue is full; retry", 503: "loading or shutting down", 504: "the request timed out"}
    return {s: {"model": ErrorResponse, "description": what.get(s, "error")} for s in statuses}
