"""Fine-tuning jobs as the routes see them: a create request checked field by field and turned into the
`softserve train` flags the worker runs, and the job, its events and checkpoints in OpenAI's shapes.

A job is the `softserve train` command with its data files given by id: the worker parses these flags with
the CLI's own parser, so a job and the CLI with the same settings and seed train alike.
OpenAI's hyperparameters map onto the trainer's: n_epochs -> --epochs, batch_size -> --batch-size,
learning_rate_multiplier scales both default learning rates (the prompt's, per kind, and the head's);
"auto" is the trainer's default. softserve's own choices come in the `softserve` object.
"""
from __future__ import annotations

import json
import random
import shlex
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.finetune.database import FINAL, Database, insert_event, now
from app.finetune.files import PURPOSE, FileNotFound, FileStore
from app.train.data import MAX_LENGTH
from app.train.trainer import DEFAULT_HEAD_LR, DEFAULT_LR, SCHEDULES, TrainConfig
from prompt_store.format import KINDS, TASKS, PromptFormatError, Task, validate_name

D = TrainConfig  # the trainer's defaults are the API's
Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | Annotated[int, Field(ge=1, le=1000)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=1024)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None


class SoftserveOptions(BaseModel):
    """softserve's choices where OpenAI has none; each is a `softserve train` flag (docs/TRAINING.md)."""
    model_config = ConfigDict(extra="forbid")
    task: Literal[tuple(TASKS)] | None = Field(None, description="default: the training file's task")
    kind: Literal[tuple(KINDS)] = Field(D.kind.value, description="prompt: shallow; prefix: deep")
    virtual_tokens: int = Field(D.virtual_tokens, ge=1)
    labels: list[Annotated[str, Field(min_length=1, pattern=r"^[^,]*$")]] | None = Field(
        None, min_length=1, description="classify: the labels; tag: the entity types (default: the training file's)")
    max_steps: int | None = Field(None, ge=1)
    max_length: int = Field(MAX_LENGTH, ge=2, le=65536)
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="held out of the training file when no validation_file")
    warmup: float = Field(D.warmup, ge=0, le=1)
    schedule: Literal[SCHEDULES] = D.schedule
    weight_decay: float = Field(D.weight_decay, ge=0)
    clip: float = Field(D.clip, gt=0)
    patience: int | None = Field(None, ge=1)
    limit: int | None = Field(None, ge=1, description="train on the first N examples (after shuffling)")
    heldout_limit: int | None = Field(None, ge=1)
    description: str = Field("", max_length=1000, description="the prompt's (default: the job that trained it)")


class JobRequest(BaseModel):
    """POST /v1/fine_tuning/jobs (OpenAI's fields, and `softserve`)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, description="the trained prompt's name (default: ft-<job id's tail>)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="deprecated by OpenAI for method")
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16)
    integrations: list[dict] | None = Field(None, max_length=0, description="none are supported")
    softserve: SoftserveOptions = SoftserveOptions()


class InvalidJob(ValueError):
    def __init__(self, message: str, param: str | None, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.code = param, code


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class TooManyJobs(Exception):
    pass


class JobFinished(Exception):
    pass


def resolve(request: JobRequest) -> tuple[dict, list[str]]:
    """The hyperparameters with "auto" resolved, and the `softserve train` flags (without the data files);
    request.softserve.task is resolved already."""
    if request.method is not None and request.method.type != "supervised":
        raise InvalidJob(f"method.type {request.method.type!r} is not supported: softserve trains soft prompts "
                         f"with supervised learning", "method.type")
    if request.method is not None and request.hyperparameters is not None:
        raise InvalidJob("give the hyperparameters in method.supervised.hyperparameters or in hyperparameters "
                         "(deprecated), not both", "hyperparameters")
    given = request.hyperparameters or (request.method and request.method.supervised
                                        and request.method.supervised.hyperparameters) or Hyperparameters()
    options = request.softserve
    hyper = {"n_epochs": D.epochs if given.n_epochs == "auto" else given.n_epochs,
             "batch_size": D.batch_size if given.batch_size == "auto" else given.batch_size,
             "learning_rate_multiplier": 1.0 if given.learning_rate_multiplier == "auto" else given.learning_rate_multiplier}
    scale = hyper["learning_rate_multiplier"]
    flags = ["--name", request.suffix, "--kind", options.kind, "--virtual-tokens", str(options.virtual_tokens),
             "--epochs", str(hyper["n_epochs"]), "--batch-size", str(hyper["batch_size"]),
             "--lr", repr(DEFAULT_LR[options.kind] * scale), "--head-lr", repr(DEFAULT_HEAD_LR * scale),
             "--seed", str(request.seed), "--max-length", str(options.max_length), "--warmup", repr(options.warmup),
             "--schedule", options.schedule, "--weight-decay", repr(options.weight_decay), "--clip", repr(options.clip),
             "--description", options.description, "--task", options.task]
    if options.labels is not None:
        flags += ["--labels", ",".join(options.labels)]
    if request.validation_file is None:
        flags += ["--heldout-fraction", repr(options.heldout_fraction)]
    for name in ("max_steps", "patience", "limit", "heldout_limit"):
        if getattr(options, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    return hyper, flags


class JobManager:
    def __init__(self, database: Database, files: FileStore, max_virtual_tokens: int, max_queued: int):
        self.database, self.files = database, files
        self.max_virtual_tokens, self.max_queued = max_virtual_tokens, max_queued

    def create(self, request: JobRequest, model_ids: set[str]) -> dict:
        """model_ids: the names of the base model that `model` may give."""
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        request = request.model_copy(update={"suffix": request.suffix or f"ft-{job_id[-8:]}",
                                             "seed": random.randrange(2**31) if request.seed is None else request.seed})
        task = self._check(request, model_ids)
        request = request.model_copy(update={"softserve": request.softserve.model_copy(update={
            "task": task, "description": request.softserve.description or f"trained by fine-tuning job {job_id}"})})
        hyper, flags = resolve(request)
        spec = {"model": request.model, "training_file": request.training_file,
                "validation_file": request.validation_file, "suffix": request.suffix, "seed": request.seed,
                "hyperparameters": hyper, "metadata": request.metadata, "flags": flags,
                "softserve": request.softserve.model_dump(exclude={"heldout_fraction"} if request.validation_file else set())}
        with self.database.transaction(write_first=True) as db:
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if queued >= self.max_queued:
                raise TooManyJobs(f"{queued} jobs are queued, the most this server takes "
                                  f"(SOFTSERVE_FINETUNE_MAX_QUEUED); retry when one has started")
            db.execute("INSERT INTO jobs (id, status, spec, created_at) VALUES (?, 'queued', ?, ?)",
                       (job_id, json.dumps(spec), now()))
            heldout = ["--heldout", request.validation_file] if request.validation_file else []
            insert_event(db, job_id, f"Created fine-tuning job {job_id}: softserve train "
                                     f"{shlex.join([request.training_file, *flags, *heldout])}")
        return self.get(job_id)

    def _check(self, request: JobRequest, model_ids: set[str]) -> str:
        """Refuse, naming the field, what the worker could not run; the task."""
        if request.model not in model_ids:
            raise InvalidJob(f"model {request.model!r} is not this server's base; use one of "
                             f"{', '.join(sorted(model_ids))}", "model", "model_not_found")
        try:
            validate_name(request.suffix)
        except PromptFormatError as e:
            raise InvalidJob(f"suffix names the trained prompt: {e}", "suffix") from None
        options = request.softserve
        if options.virtual_tokens > self.max_virtual_tokens:
            raise InvalidJob(f"softserve.virtual_tokens: at most {self.max_virtual_tokens} "
                             f"(SOFTSERVE_MAX_VIRTUAL_TOKENS)", "softserve.virtual_tokens")
        if request.validation_file is not None and "heldout_fraction" in options.model_fields_set:
            raise InvalidJob("softserve.heldout_fraction splits the training file; it does not apply with a "
                             "validation_file", "softserve.heldout_fraction")
        training = self._data_file(request.training_file, "training_file")
        task = options.task or training["task"]
        if task != training["task"]:
            raise InvalidJob(f"softserve.task is {task!r} but training_file holds {training['task']} examples",
                             "softserve.task")
        if task == Task.GENERATE and options.labels is not None:
            raise InvalidJob("softserve.labels applies to tag and classify", "softserve.labels")
        labels = set(options.labels or json.loads(training["labels"]))
        if missing := set(json.loads(training["labels"])) - labels:
            raise InvalidJob(f"softserve.labels leaves out {', '.join(sorted(missing))}, which training_file uses",
                             "softserve.labels")
        if request.validation_file is not None:
            validation = self._data_file(request.validation_file, "validation_file")
            if validation["task"] != task:
                raise InvalidJob(f"validation_file holds {validation['task']} examples, training_file {task}",
                                 "validation_file")
            if unknown := set(json.loads(validation["labels"])) - labels:
                raise InvalidJob(f"validation_file uses {', '.join(sorted(unknown))}, which training does not learn",
                                 "validation_file")
        return task

    def _data_file(self, file_id: str, param: str) -> dict:
        try:
            info = self.files.get(file_id)
        except FileNotFound:
            raise InvalidJob(f"{param}: no file with id {file_id!r}", param, "file_not_found") from None
        if info["purpose"] != PURPOSE:
            raise InvalidJob(f"{param}: file {file_id!r} has purpose {info['purpose']!r}, not {PURPOSE!r}", param)
        return info

    def _row(self, job_id: str):
        with self.database.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no fine-tuning job with id {job_id!r}")
        return row

    def get(self, job_id: str) -> dict:
        return job_object(self._row(job_id))

    def list(self, after: str | None, limit: int, metadata: dict[str, str]) -> tuple[list[dict], bool]:
        """metadata: only jobs whose metadata holds every one of these pairs."""
        pair = "EXISTS (SELECT 1 FROM json_each(spec, '$.metadata') WHERE key = ? AND value = ?)"
        where = " AND ".join([pair] * len(metadata)) or "1"
        args = tuple(x for item in metadata.items() for x in item)
        rows, more = self.database.page("jobs", where, args, self._after("jobs", after), limit)
        return [job_object(row) for row in rows], more

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        self._row(job_id)
        rows, more = self.database.page("events", "job_id = ?", (job_id,), _seq(after, "ftevent-"), limit)
        return [{"id": f"ftevent-{row['seq']}", "object": "fine_tuning.job.event", "created_at": row["created_at"],
                 "level": row["level"], "message": row["message"], "type": row["type"],
                 "data": json.loads(row["data"]) if row["data"] else {}} for row in rows], more

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        self._row(job_id)
        rows, more = self.database.page("checkpoints", "job_id = ?", (job_id,), _seq(after, "ftckpt-"), limit)
        return [checkpoint_object(row) for row in rows], more

    def cancel(self, job_id: str) -> dict:
        """A queued job ends at once; a running one's replica sees it on its next lease renewal and stops it."""
        with self.database.transaction(write_first=True) as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no fine-tuning job with id {job_id!r}")
            if row["status"] in FINAL:
                raise JobFinished(f"fine-tuning job {job_id} has already ended ({row['status']})")
            db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?", (now(), job_id))
            insert_event(db, job_id, "Job cancelled")
        return self.get(job_id)

    def _after(self, table: str, after: str | None) -> int | None:
        if after is None:
            return None
        seq = self.database.seq_of(table, after)
        if seq is None:
            raise JobNotFound(f"no fine-tuning job with id {after!r} (after)")
        return seq


def _seq(after: str | None, prefix: str) -> int | None:
    if after is None:
        return None
    number = after.removeprefix(prefix)
    if not after.startswith(prefix) or not number.isdigit():
        raise InvalidJob(f"after: {after!r} is not an id of this listing ({prefix}N)", "after")
    return int(number)


def job_object(row) -> dict:
    spec = json.loads(row["spec"])
    hyper = spec["hyperparameters"]
    return {"id": row["id"], "object": "fine_tuning.job", "model": spec["model"], "created_at": row["created_at"],
            "finished_at": row["finished_at"], "fine_tuned_model": row["fine_tuned_model"],
            "organization_id": "softserve", "result_files": json.loads(row["result_files"]), "status": row["status"],
            "validation_file": spec["validation_file"], "training_file": spec["training_file"],
            "hyperparameters": hyper, "trained_tokens": row["trained_tokens"],
            "error": json.loads(row["error"]) if row["error"] else None, "seed": spec["seed"],
            "estimated_finish": None, "integrations": [], "metadata": spec["metadata"],
            "user_provided_suffix": spec["suffix"],
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "softserve": spec["softserve"]}


def checkpoint_object(row) -> dict:
    """OpenAI's metrics names where they fit (full_valid_loss, full_valid_mean_token_accuracy), and every held-out
    metric of the task as full_valid_<name>."""
    record = json.loads(row["metrics"])
    metrics = {"step": row["step"], "train_loss": record["train_loss"]}
    for name, value in record.items():
        if name not in ("epoch", "steps", "train_loss", "examples"):
            metrics["full_valid_" + ("mean_token_accuracy" if name == "token_accuracy" else name)] = value
    return {"id": f"ftckpt-{row['seq']}", "object": "fine_tuning.job.checkpoint", "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": f"{row['job_id']}:step-{row['step']}", "fine_tuning_job_id": row["job_id"],
            "metrics": metrics, "step_number": row["step"]}

