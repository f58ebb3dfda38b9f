"""Pydantic models of the OpenAI wire format (plus vLLM's extra request fields).

Requests ignore unknown fields, as vLLM does, so clients written for newer OpenAI APIs keep
working; wrong types and NaN/Infinity are rejected (400): numbers and booleans are strict (no
`true` as 1, no "1.5" as a number), and text may not hold lone surrogates (JSON allows
"\\ud800"; the tokenizer and UTF-8 do not). Value ranges that the engine checks (temperature,
top_p, penalties, ...) are left to ``SamplingParams`` so the messages come from one place; the
bounds here only keep values inside what the engine can represent.
"""
from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_serializer
from pydantic_core import PydanticCustomError

# torch.Generator.manual_seed accepts this range
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
# Integers the engine keeps in int32/int64 tensors: every count and id is bounded by this, so no
# value a client sends can overflow inside an engine step (a huge top_k once failed the batch).
INT32_MAX = (1 << 31) - 1
# Strict: JSON booleans and strings are not integers ("max_tokens": true is a 400, not 1).
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Strict(), Field(ge=0, le=INT32_MAX)]
Float = Annotated[float, Strict()]  # an integer is fine, a boolean or a string is not
Bool = Annotated[bool, Strict()]

_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: str) -> str:
    m = _SURROGATE.search(value)
    if m:
        raise PydanticCustomError("invalid_text", "not valid Unicode text: a lone surrogate "
                                  "({char}) at character {at}", {"char": ascii(m.group())[1:-1],
                                                                 "at": m.start()})
    return value


JSON_INT_MIN, JSON_INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgspec carries to the engine core


def _check_json_text(value: Any) -> Any:
    """Every string (keys included) in a free-form JSON value, checked like Text, and every
    integer inside what the engine core's wire format holds (a JSON schema with a minimum of
    -2**63 - 1 once failed its request with a 500 when it was sent to the engine core)."""
    stack = [value]
    while stack:  # iterative: nesting is only bounded by the JSON parser
        v = stack.pop()
        if isinstance(v, str):
            _check_text(v)
        elif isinstance(v, int) and not isinstance(v, bool) and not JSON_INT_MIN <= v <= JSON_INT_MAX:
            raise PydanticCustomError("invalid_number", "an integer of {digits} digits is outside "
                                      "the range this server carries ([-2**63, 2**64 - 1])",
                                      {"digits": len(str(abs(v)))})
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return value


Text = Annotated[str, AfterValidator(_check_text)]
JSONObject = Annotated[dict[str, Any], AfterValidator(_check_json_text)]
# OpenAI's own limits
MAX_N = 128
MAX_PROMPTS = 2048  # prompts of one completion request, inputs of one embedding request
MAX_TOP_LOGPROBS = 20
LOGIT_BIAS_RANGE = 100.0


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ResponseModel(BaseModel):
    """Responses are built by the server; logprobs are clamped to finite values before."""


# ---------------------------------------------------------------------------------------- errors

class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


# -------------------------------------------------------------------------------------- requests

class StreamOptions(OpenAIModel):
    include_usage: Optional[Bool] = False
    continuous_usage_stats: Optional[Bool] = False


class JsonSchemaFormat(OpenAIModel):
    name: Optional[Text] = None
    description: Optional[Text] = None
    schema_: Optional[JSONObject] = Field(None, alias="schema", description="The JSON schema "
                                              "the output must follow.")
    strict: Optional[Bool] = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object) or
    json_schema (output valid against `json_schema.schema`)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's `structured_outputs` object: exactly one of json, regex, choice, grammar,
    json_object, structural_tag."""
    json_: Optional[Union[JSONObject, Text]] = Field(None, alias="json", description="A JSON schema.")
    regex: Optional[Text] = None
    choice: Optional[list[Text]] = None
    grammar: Optional[Text] = Field(None, description="EBNF (GBNF) or Lark.")
    json_object: Optional[Bool] = None
    structural_tag: Optional[Text] = Field(None, description="xgrammar's structural-tag JSON.")
    disable_any_whitespace: Bool = False
    whitespace_pattern: Optional[Text] = Field(None, description="JSON: a regex every whitespace "
                                              "run must match.")


class SamplingFields(OpenAIModel):
    """Fields shared by chat and completion requests; names follow OpenAI, then vLLM."""
    model: Optional[str] = Field(None, description="Served model name; omitted means the default.")
    n: Int = Field(1, ge=1, le=MAX_N)
    temperature: Optional[Float] = None
    top_p: Optional[Float] = None
    presence_penalty: Optional[Float] = 0.0
    frequency_penalty: Optional[Float] = 0.0
    logit_bias: Optional[dict[str, Float]] = None
    seed: Optional[Int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Optional[Union[Text, list[Text]]] = None
    stream: Optional[Bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[Text] = None
    # vLLM extras
    top_k: Optional[Int] = Field(None, ge=-1, le=INT32_MAX, description="-1 or 0: off.")
    min_p: Optional[Float] = None
    repetition_penalty: Optional[Float] = None
    min_tokens: Count = 0
    ignore_eos: Bool = False
    stop_token_ids: Optional[list[TokenId]] = None
    skip_special_tokens: Bool = True
    spaces_between_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    allowed_token_ids: Optional[list[TokenId]] = Field(None, description="vLLM's extra: only "
                                                       "these token ids may be generated.")
    bad_words: Optional[list[Text]] = Field(None, description="vLLM's extra: words never "
                                            "generated (alone or after a space).")
    return_token_ids: Bool = Field(False, description="vLLM's extra: each choice (and each "
                                   "streamed chunk) carries its token_ids; the response its "
                                   "prompt_token_ids. Chunks are sent for every new token then.")
    # structured outputs: at most one of these (OpenAI's, vLLM's, vLLM's older fields)
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None
    guided_json: Optional[Union[JSONObject, Text]] = None
    guided_regex: Optional[Text] = None
    guided_choice: Optional[list[Text]] = None
    guided_grammar: Optional[Text] = None
    guided_whitespace_pattern: Optional[Text] = None
    guided_decoding_backend: Optional[Text] = Field(None, description="Accepted: pagoda's backend "
                                                   "is xgrammar.")


class ImageURL(OpenAIModel):
    url: Text = Field(..., description="data:image/...;base64,..., http(s):// or file:// (under "
                     "--allowed-local-media-path).")
    detail: Optional[Text] = None


class TextPart(OpenAIModel):
    """A content part: {"type": "text", "text"} or, for vision models, {"type": "image_url",
    "image_url": {"url"}} (the URL may also be given as a plain string)."""
    type: Text = "text"
    text: Optional[Text] = None
    image_url: Optional[ImageURL] = None

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_as_string(cls, v):
        return {"url": v} if isinstance(v, str) else v


class ChatMessage(OpenAIModel):
    role: Text
    content: Optional[Union[Text, list[TextPart]]] = None
    name: Optional[Text] = None
    tool_call_id: Optional[Text] = None
    tool_calls: Optional[list[JSONObject]] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[Count] = Field(None, description="Deprecated by OpenAI in favour of "
                                      "max_completion_tokens; both are accepted.")
    max_completion_tokens: Optional[Count] = None
    logprobs: Optional[Bool] = False
    top_logprobs: Optional[Int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[JSONObject]] = Field(None, description="Passed to the chat template; "
                                                  "calls are parsed with --enable-auto-tool-choice.")
    tool_choice: Optional[Union[Text, JSONObject]] = Field(
        None, description="none, auto (with --enable-auto-tool-choice), required, or "
        '{"type": "function", "function": {"name": ...}}: required and named calls are generated '
        "through a grammar of the tools' schemas.")
    parallel_tool_calls: Optional[Bool] = Field(True, description="With tool_choice required: "
                                                "false allows one call only.")
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False
    chat_template: Optional[Text] = None
    chat_template_kwargs: Optional[JSONObject] = None


PromptType = Union[Text, list[Text], list[TokenId], list[list[TokenId]]]
# -1 (the model's max_model_len) or k >= 1 (keep the last k tokens); 0 and other negatives are 400s
TruncatePromptTokens = Annotated[int, Strict(), Field(ge=-1, le=INT32_MAX)]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    max_tokens: Optional[Count] = 16
    echo: Optional[Bool] = False
    logprobs: Optional[Int] = Field(None, ge=0, le=INT32_MAX)
    suffix: Optional[Text] = Field(None, description="Not supported: a request that sets it gets a 400.")
    best_of: Optional[Int] = Field(None, ge=1, le=MAX_N, description="Only best_of == n is supported.")


class TokenizeCompletionRequest(OpenAIModel):
    model: Optional[str] = None
    prompt: Text
    add_special_tokens: Bool = True
    return_token_strs: Bool = False


class TokenizeChatRequest(OpenAIModel):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False
    add_special_tokens: Bool = False
    return_token_strs: Bool = False
    tools: Optional[list[JSONObject]] = None
    chat_template: Optional[Text] = None
    chat_template_kwargs: Optional[JSONObject] = None


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class DetokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    tokens: list[TokenId]


class EmbeddingRequest(OpenAIModel):
    model: Optional[str] = Field(None, description="Served model name; omitted means the default.")
    input: PromptType = Field(..., description="A string, a list of strings, a list of token ids, "
                              "or a list of token-id lists; one embedding per item.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded.")
    dimensions: Optional[Int] = Field(None, ge=1, le=INT32_MAX, description="Matryoshka models "
                                      "(config `matryoshka_dimensions` / `is_matryoshka`): keep the "
                                      "first `dimensions` values, then normalize; other models accept "
                                      "only their own size.")
    user: Optional[Text] = None
    # vLLM extras
    add_special_tokens: Bool = Field(True, description="Add the tokenizer's special tokens "
                                     "([CLS] ... [SEP] for BERT) to text inputs.")
    truncate_prompt_tokens: Optional[TruncatePromptTokens] = Field(
        None, description="Keep the last k tokens of each input; -1: the model's max_model_len.")


class PoolingRequest(OpenAIModel):
    """vLLM's /pooling: the pooler's output per input (an embedding model's pooled vector,
    a classifier's logits)."""
    model: Optional[str] = None
    input: PromptType
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[Int] = Field(None, ge=1, le=INT32_MAX)
    normalize: Optional[Bool] = Field(None, description="Embedding models: L2-normalize (default: "
                                      "the model's own setting).")
    activation: Optional[Bool] = Field(None, description="Classifiers: probabilities instead of "
                                       "logits (default false).")
    truncate_prompt_tokens: Optional[TruncatePromptTokens] = None
    add_special_tokens: Bool = True
    user: Optional[Text] = None


class ClassificationRequest(OpenAIModel):
    model: Optional[str] = None
    input: PromptType
    activation: Optional[Bool] = Field(None, description="false: raw logits instead of "
                                       "probabilities.")
    truncate_prompt_tokens: Optional[TruncatePromptTokens] = None
    add_special_tokens: Bool = True
    user: Optional[Text] = None


Texts = Union[Text, list[Text]]


class ScoreRequest(OpenAIModel):
    """vLLM's /score: text_1 against each text_2 (1 -> 1, 1 -> N) or pairwise (N -> N)."""
    model: Optional[str] = None
    text_1: Texts
    text_2: Texts
    truncate_prompt_tokens: Optional[TruncatePromptTokens] = None
    activation: Optional[Bool] = Field(None, description="Cross-encoders: false gives the raw logit "
                                       "instead of its sigmoid.")
    user: Optional[Text] = None


class RerankDocument(OpenAIModel):
    text: Text


class RerankRequest(OpenAIModel):
    """Jina's and Cohere's rerank request."""
    model: Optional[str] = None
    query: Text
    documents: list[Union[Text, RerankDocument]] = Field(..., min_length=1)
    top_n: Optional[Int] = Field(None, ge=0, le=INT32_MAX, description="How many results; 0 or "
                                 "omitted: all documents.")
    return_documents: Bool = Field(True, description="Include each result's document text.")
    truncate_prompt_tokens: Optional[TruncatePromptTokens] = None
    user: Optional[Text] = None


# ------------------------------------------------------------------------------------- responses

class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: Optional[list[ChatLogprobToken]] = None


class ChatResponseMessage(ResponseModel):
    role: str = "assistant"
    content: Optional[str] = None
    # --reasoning-parser: the model's thinking (vLLM's field)
    reasoning_content: Optional[str] = Field(None, exclude_if=lambda v: v is None)
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = Field(None, exclude_if=lambda v: v is None)  # return_token_ids


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class DeltaMessage(ResponseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        # OpenAI's chunks carry only the keys that changed: {"role": ...} first, then {"content": ...}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = Field(None, exclude_if=lambda v: v is None)  # return_token_ids


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = Field(None, exclude_if=lambda v: v is None)  # return_token_ids
    prompt_token_ids: Optional[list[int]] = Field(None, exclude_if=lambda v: v is None)


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


class EmbeddingData(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(ResponseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class PoolingListResponse(ResponseModel):
    """What /pooling, /classify and /score answer: a list of per-input results and the usage."""
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    usage: UsageInfo


class PoolingData(ResponseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: Union[list[float], str]


class PoolingResponse(PoolingListResponse):
    data: list[PoolingData]


class ClassificationData(ResponseModel):
    index: int
    label: Optional[str] = None
    probs: list[float]
    num_classes: int


class ClassificationResponse(PoolingListResponse):
    data: list[ClassificationData]


class ScoreData(ResponseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(PoolingListResponse):
    data: list[ScoreData]


class RerankResultDocument(ResponseModel):
    text: str


class RerankResult(ResponseModel):
    index: int
    document: Optional[RerankResultDocument] = Field(None, exclude_if=lambda v: v is None)
    relevance_score: float


class RerankUsage(ResponseModel):
    total_tokens: int


class RerankResponse(ResponseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ServerLoadResponse(ResponseModel):
    server_load: int


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pagoda"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    capabilities: Optional[list[str]] = Field(None, description='["vision"]: the model takes images.')


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[TokenId]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(ResponseModel):
    prompt: str


class VersionResponse(ResponseModel):
    version: str


# ------------------------------------------------------------------------------ Responses API

class ResponseTextFormat(OpenAIModel):
    """text.format: text, json_object, or json_schema (name, schema, strict)."""
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Optional[Text] = None
    description: Optional[Text] = None
    schema_: Optional[JSONObject] = Field(None, alias="schema")
    strict: Optional[Bool] = None


class ResponseTextConfig(OpenAIModel):
    format: Optional[ResponseTextFormat] = None


class ResponsesRequest(OpenAIModel):
    model: Optional[str] = Field(None, description="Served model name; omitted means the default.")
    input: Union[Text, list[JSONObject]] = Field(..., description="A string (one user message) or "
                                                    "a list of items: messages ({role, content}), "
                                                    "function_call and function_call_output items.")
    instructions: Optional[Text] = Field(None, description="A system message for this response only "
                                        "(not carried over by previous_response_id).")
    previous_response_id: Optional[Text] = Field(None, description="Continue the conversation of a "
                                                "stored response.")
    store: Optional[Bool] = Field(True, description="Keep the response for GET /v1/responses/{id} "
                                  "and previous_response_id (in memory, --responses-store-size/-ttl).")
    background: Optional[Bool] = Field(False, description="Return at once (status queued) and run "
                                       "in the server; poll, stream or cancel it by id.")
    stream: Optional[Bool] = False
    tools: Optional[list[JSONObject]] = Field(None, description="Function tools: {type: function, "
                                                  "name, description, parameters, strict}.")
    tool_choice: Optional[Union[Text, JSONObject]] = "auto"
    parallel_tool_calls: Optional[Bool] = True
    text: Optional[ResponseTextConfig] = None
    max_output_tokens: Optional[Count] = None
    temperature: Optional[Float] = None
    top_p: Optional[Float] = None
    reasoning: Optional[JSONObject] = Field(None, description="{effort}: none or minimal turns "
                                                "thinking off (chat_template_kwargs.enable_thinking).")
    metadata: Optional[dict[Text, Text]] = None
    user: Optional[Text] = None
    truncation: Optional[Literal["auto", "disabled"]] = None


class ResponseOutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)


class ResponseOutputMessage(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    content: list[ResponseOutputText] = Field(default_factory=list)


class ResponseFunctionCall(ResponseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ResponseReasoningText(ResponseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ResponseReasoningItem(ResponseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ResponseReasoningText] = Field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


ResponseOutputItem = Union[ResponseOutputMessage, ResponseFunctionCall, ResponseReasoningItem]


class ResponseInputTokensDetails(ResponseModel):
    cached_tokens: int = 0


class ResponseOutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseModel):
    input_tokens: int = 0
    input_tokens_details: ResponseInputTokensDetails = Field(default_factory=ResponseInputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: ResponseOutputTokensDetails = Field(default_factory=ResponseOutputTokensDetails)
    total_tokens: int = 0


class ResponseErrorInfo(ResponseModel):
    code: str
    message: str


class ResponseObject(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=_now)
    completed_at: Optional[int] = None
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[ResponseOutputItem] = Field(default_factory=list)
    error: Optional[ResponseErrorInfo] = None
    incomplete_details: Optional[dict[str, Any]] = None
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    parallel_tool_calls: bool = True
    tool_choice: Union[str, dict[str, Any]] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: Optional[dict[str, Any]] = None
    reasoning: Optional[dict[str, Any]] = None
    store: bool = True
    background: bool = False
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    truncation: Optional[str] = None
    usage: Optional[ResponseUsage] = None
