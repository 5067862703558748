"""vLLM's tokenizer helpers: POST /tokenize (a text, or chat messages rendered with the template) and
POST /detokenize, with vLLM's request and response shapes."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from app.api.deps import get_services, require_api_key
from app.api.errors import APIError
from app.api.openai_schemas import ChatMessage, Refused, Strict
from app.api.resolution import note_prompt, resolve_prompt, text_room
from app.api.sampling_fields import TokenId
from app.api.schemas import error_responses
from app.services import Services
from prompt_store.format import BASE_MODEL

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(400, 401, 404, 413, 503))


class TokenizeCompletion(Strict):
    model: str = Field(BASE_MODEL, description="'base', the base model's id, or a prompt (its virtual tokens count "
                                           "against max_model_len)")
    prompt: str = Field(description="the text, as /v1/completions would tokenize it")
    add_special_tokens: bool = Field(False, description="add the tokenizer's special tokens (/v1/completions does not)")
    return_token_strs: bool = Field(False, description="also each token's text")


class TokenizeChat(Strict):
    model: str = BASE_MODEL
    messages: list[ChatMessage] = Field(min_length=1, description="rendered as /v1/chat/completions renders them")
    add_generation_prompt: Refused("the template always ends with the assistant's turn", True) = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="text tokens (input + output) a request with this model can have")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Strict):
    model: str = BASE_MODEL
    tokens: list[TokenId] = Field(description="token ids")


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, summary="Tokenize a text or chat messages (vLLM)")
async def tokenize(body: TokenizeCompletion | TokenizeChat, request: Request,
                   services: Services = Depends(get_services)) -> TokenizeResponse:
    note_prompt(request, services, body.model)
    prompt = await resolve_prompt(request, services, body.model)
    if isinstance(body, TokenizeChat):
        ids = await services.encoder.chat([m.as_template_input() for m in body.messages])
    elif body.add_special_tokens:
        services.encoder.check_text(body.prompt, "prompt")
        ids = services.tokenizer.hf.encode(body.prompt, add_special_tokens=True)
    else:
        ids = await services.encoder.encode(body.prompt, "prompt")
    strs = services.tokenizer.hf.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=text_room(services, prompt), tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="Token ids to text (vLLM)")
async def detokenize(body: DetokenizeRequest, request: Request,
                     services: Services = Depends(get_services)) -> DetokenizeResponse:
    note_prompt(request, services, body.model)
    await resolve_prompt(request, services, body.model)  # 404 for an unknown model, as elsewhere
    vocab = services.loaded.args.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"tokens: ids must be below the vocabulary size {vocab}", "invalid_token", "tokens")
    return DetokenizeResponse(prompt=services.tokenizer.decode(body.tokens))
