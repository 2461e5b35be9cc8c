"""Request and error bodies of the HTTP service (pydantic 1): the OpenAPI schema clients see.

The generation options come from ``llm_module.options.OPTIONS``, the one schema the engine
validates against, so the two cannot drift; a body with a field the API does not know is refused
as the schema says (``additionalProperties: false``).

The schema is exact in both directions, so a fuzzer (Schemathesis) can hold the server to it:
every field is strictly typed (no pydantic coercion of "5" into 5 or of 5 into "5"), a field that
may be null says so, and strings the engine refuses when blank (paths, prompts) say so too.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Union

from pydantic import BaseModel, ConstrainedFloat, ConstrainedInt, ConstrainedStr, Extra, Field, conlist, create_model
from pydantic.validators import float_finite_validator, number_size_validator

from llm_module.adapter_files import NAME_RE
from llm_module.export import ALIASES as EXPORT_ALIASES
from llm_module.export import FORMATS, LORA_TYPES, MODEL_TYPES
from llm_module.options import OPTIONS, SEED_RANGE
from llm_module.training.params import BASE_DTYPES

EXPORT_FORMATS = (*FORMATS, *EXPORT_ALIASES)
# White space as Python's str.strip() sees it (regex engines differ on what \s covers), and a string with
# something besides white space in it and no NUL byte (what resolve_user_path and the prompts refuse).
WHITE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK = rf"^[^\x00]*[^\x00{WHITE}][^\x00]*$"


# ------------------------------------------------------------------ strict scalar types
class StrictText(ConstrainedStr):
    strict = True


class NonBlank(ConstrainedStr):
    """A string with a visible character and no NUL byte: a path, a prompt, a name."""

    strict = True
    regex = NON_BLANK


class ExportName(ConstrainedStr):
    """A file name stem: something besides white space, no '/', not hidden (export.check_options)."""

    strict = True
    regex = rf"^(?!\.)[^/\x00]*[^/\x00{WHITE}][^/\x00]*$"


class AdapterName(ConstrainedStr):
    strict = True
    regex = NAME_RE.pattern


def _integer(value: Any) -> int:
    """A JSON integer (1.0 is one, as JSON Schema counts); refuse booleans, strings and fractions."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("value is not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("value is not a whole number")
        value = int(value)
    return value


class StrictInt(ConstrainedInt):
    """A JSON integer, with the bounds of a subclass."""

    @classmethod
    def __get_validators__(cls):
        yield _integer
        yield number_size_validator


class Seed(StrictInt):
    ge, le = SEED_RANGE


def _number(value: Any) -> float:
    """JSON numbers (ints included) as floats; refuse booleans and strings instead of coercing them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("value is not a number")
    return float(value)


class Number(ConstrainedFloat):
    """A JSON number (integer or not), with the bounds of a subclass."""

    @classmethod
    def __get_validators__(cls):
        yield _number
        yield number_size_validator
        yield float_finite_validator


class _Exactly:
    """A field that takes a value of ``accepts`` and nothing pydantic 1 would coerce into one."""

    accepts: type
    json_type: str
    refusal: str

    @classmethod
    def __get_validators__(cls):
        yield cls.validate

    @classmethod
    def validate(cls, value: Any) -> Any:
        if not isinstance(value, cls.accepts):
            raise TypeError(cls.refusal)
        return value

    @classmethod
    def __modify_schema__(cls, schema: dict) -> None:
        schema.update(type=cls.json_type)


class StrictDict(_Exactly, dict):
    """A JSON object (pydantic 1 would turn a list of pairs into a dict)."""

    accepts, json_type, refusal = dict, "object", "value is not an object"


class StrictBool(_Exactly, int):
    """true or false, nothing else (pydantic 1 would take "yes", 1 and "off")."""

    accepts, json_type, refusal = bool, "boolean", "value is not true or false"


class NonEmptyText(ConstrainedStr):
    strict = True
    min_length = 1


def bounded(kind: type, *, gt=None, ge=None, lt=None, le=None) -> type:
    """A strict int or number type with these bounds (None: unbounded)."""
    base = StrictInt if kind is int else Number
    bounds = {k: v for k, v in {"gt": gt, "ge": ge, "lt": lt, "le": le}.items() if v is not None}
    return type(f"{base.__name__}_{'_'.join(f'{k}{v}' for k, v in bounds.items())}", (base,), bounds)


# ------------------------------------------------------------------ models
def nullable_optionals(schema: dict, model: type[BaseModel]) -> None:
    """pydantic 1 leaves null out of an Optional field's schema; put it in, as the server accepts it."""
    for field in model.__fields__.values():
        prop = schema.get("properties", {}).get(field.alias)
        if prop is None or not field.allow_none or "anyOf" in prop and {"type": "null"} in prop["anyOf"]:
            continue
        keep = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        inner = prop.pop("anyOf", None) or [dict(prop)]
        prop.clear()
        prop.update(keep, anyOf=[*inner, {"type": "null"}])


class Strict(BaseModel):
    class Config:
        extra = Extra.forbid
        schema_extra = staticmethod(nullable_optionals)


class Role(str, Enum):  # noqa: UP042 (pydantic 1 and Python 3.10 know no StrEnum)
    system = "system"
    user = "user"
    assistant = "assistant"


class Message(Strict):
    role: Role
    content: StrictText


def _option_field(option) -> tuple:
    bounds = {}
    if option.low is not None:
        bounds["gt" if option.low_open else "ge"] = option.low
    if option.high is not None:
        bounds["le"] = option.high
    kind = StrictBool if option.kind is bool else bounded(option.kind, **bounds)
    return (kind | None, Field(None, description=option.doc))


def _prompt_or_messages(schema: dict, model: type[BaseModel]) -> None:
    nullable_optionals(schema, model)
    schema["example"] = {"prompt": "The capital of France is", "do_sample": False}
    schema["anyOf"] = [  # the engine's rule (serving/intake.py): a prompt or messages, not both
        {"required": ["prompt"], "properties": {"prompt": {"not": {"type": "null"}}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
    ]


class _GenerateBase(Strict):
    prompt: Union[NonBlank, conlist(NonBlank, min_items=1)] | None = Field(None, description="A prompt, or a list "
                                                                                           "of prompts.")
    messages: list[Message] | None = Field(None, description="Chat turns [{role, content}], instead of prompt.",
                                           min_items=1)
    chat: StrictBool = Field(False, description="Wrap prompt in the model's chat template.")
    system_prompt: StrictText | None = None
    adapter: StrictText | None = Field(None, description="Adapter name; 'base' for none; omitted: the default "
                                                         "adapter.")
    seed: Seed | None = Field(None, description="Same seed, same text (sampling).")
    stop: Union[NonEmptyText, list[NonEmptyText]] | None = Field(None, description="Cut the text before the "
                                                                                   "first of these.")
    return_full_text: StrictBool | None = Field(None, description="Prompt + completion (default for plain "
                                                                  "prompts).")
    json_schema: StrictDict | None = Field(None, description="Constrain the answer to JSON of this schema.")

    class Config:
        schema_extra = staticmethod(_prompt_or_messages)

    def options(self) -> dict:
        """The body as engine keyword arguments (unset fields left out)."""
        values = self.dict(exclude_none=True)
        if values.get("chat") is False:
            values.pop("chat")
        if self.messages is not None:
            values["messages"] = [{"role": m.role.value, "content": m.content} for m in self.messages]
        return values


GenerateBody = create_model("GenerateBody", __base__=_GenerateBase,
                            **{name: _option_field(option) for name, option in OPTIONS.items()})
GenerateBody.__doc__ = ("One generate call (every option of llm.generate, README): prompt or messages, not both. "
                        "Some limits depend on the prompt and cannot be told in advance: max_length must leave "
                        "room for an answer after the prompt's tokens, and json_schema must be a schema the "
                        "structured-output grammar can use.")


def _one_stream(schema: dict, model: type[BaseModel]) -> None:
    """What a stream takes, as the engine checks it (one prompt, one answer, no beams): stated here, refused there
    with its own message."""
    _prompt_or_messages(schema, model)
    props = schema["properties"]
    props["prompt"]["anyOf"] = [b for b in props["prompt"]["anyOf"] if b.get("type") != "array"]
    props["prompt"]["description"] = "The prompt."
    for name in ("num_return_sequences", "num_beams"):
        props[name]["anyOf"][0]["maximum"] = 1
        props[name]["description"] += " Always 1 for a stream."


class StreamBody(GenerateBody):
    """One streamed completion: one prompt (or messages), one answer, no beam search."""

    class Config:
        schema_extra = staticmethod(_one_stream)


class LoadAdapterBody(Strict):
    path: NonBlank = Field(..., description="Adapter folder (inside the data root when one is set).")
    name: AdapterName | None = Field(None, description="Name to load it under (default: its folder name).")
    make_default: StrictBool = False


class DefaultAdapterBody(Strict):
    name: StrictText | None = Field(None, description="The adapter generate uses when none is named; null: the "
                                                      "base model.")


class TrainFields(Strict):
    """llm.train's options, as POST /v1/jobs/train and the train action both take them."""

    adapter_name: AdapterName | None = None
    data_format: StrictText | None = None
    val_set_size: Number | None = None
    eval_file: NonBlank | None = None
    seed: StrictInt | None = None
    prompt_template: StrictText | None = None
    train_on_inputs: StrictBool | None = None
    check_forgetting: StrictBool | None = Field(None, description="Answer general questions with and without the "
                                                                  "adapter after training (default true).")
    replay: bounded(int, ge=0) | None = Field(None, description="Mix this many general examples (the base model's "
                                                                "own answers) into the data (default 0).")
    base_dtype: Literal[BASE_DTYPES] | None = Field(None, description="How the training copy holds the frozen base "
                                                                      "weights (auto: bf16 on CPUs with bf16 "
                                                                      "arithmetic).")
    protect_general: Union[StrictBool, bounded(float, ge=0, lt=1)] | None = Field(
        None, description="Keep the adapter out of the directions holding this share of general prompts' input "
                          "energy, so general answers stay the base model's (default 0.99; 0 or false: off).")
    num_processes: bounded(int, ge=1) | None = Field(None, description="Train as a torchrun job of N processes.")
    lora_config_kwargs: StrictDict | None = None
    training_args_kwargs: StrictDict | None = None


class TrainBody(TrainFields):
    data_file: NonBlank
    output_dir: NonBlank
    training_params: StrictDict | None = None
    resume_from_checkpoint: Union[StrictBool, NonBlank] = False

    def options(self) -> dict:
        return self.dict(exclude_none=True)


def _types(types) -> dict:
    return {"anyOf": [{"type": "null"}, {"enum": list(types)}, {"type": "array", "items": {"enum": list(types)}}]}


def export_rule(nested: str | None = None) -> list[dict]:
    """export.check_options' rule as anyOf branches: the quantization types each format takes (format omitted:
    gguf); ``nested``: the key under which the options may come too ("**kwargs")."""
    branches = []
    for fmt, types, required in (("hf", ["f32"], True), ("gguf", MODEL_TYPES, False), ("lora-gguf", LORA_TYPES, True)):
        quantization = _types(types)
        if fmt == "hf":
            quantization["anyOf"][2]["maxItems"] = 1
        names = [fmt, *(alias for alias, target in EXPORT_ALIASES.items() if target == fmt)]
        props = {"format": {"enum": names}, "quantization": quantization}
        if nested:
            props[nested] = {"properties": {"quantization": quantization}}
        branches.append({"properties": props, **({"required": ["format"]} if required else {})})
    return branches


def _export_rules(schema: dict, model: type[BaseModel]) -> None:
    nullable_optionals(schema, model)
    schema["anyOf"] = export_rule()


class ExportBody(Strict):
    adapter: NonBlank = Field(..., description="A loaded adapter's name, or an adapter folder (a llm.train "
                                               "output_dir works).")
    output_dir: NonBlank = Field(..., description="Folder to write (inside the data root when one is set).")
    format: Literal["hf", "gguf", "lora-gguf", "ollama"] = Field(
        "gguf", description="hf: merged safetensors; gguf (ollama): merged GGUF + Modelfile; lora-gguf: the adapter "
                            "for llama.cpp's --lora.")
    quantization: Union[StrictText, list[StrictText]] | None = Field(
        None, description="GGUF type(s): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (default f16; lora-gguf f32).")
    name: ExportName | None = Field(None, description="File name stem (default: the adapter's name).")
    overwrite: StrictBool | None = Field(None, description="Replace an output_dir that holds other files.")
    system_prompt: StrictText | None = Field(None, description="The Modelfile's SYSTEM line (default: the chat "
                                                               "template's own default system prompt).")

    class Config:
        schema_extra = staticmethod(_export_rules)

    def options(self) -> dict:
        return self.dict(exclude_none=True)


class EvaluateBody(Strict):
    data_file: NonBlank
    adapter: StrictText | None = None
    batch_size: bounded(int, ge=1) | None = None
    cutoff_len: bounded(int, ge=1) | None = None
    data_format: StrictText | None = None
    prompt_template: StrictText | None = None
    train_on_inputs: StrictBool | None = None

    def options(self) -> dict:
        return self.dict(exclude_none=True)


# ------------------------------------------------------------------ errors
class ErrorDetail(BaseModel):
    type: str = Field(..., description="What kind of error: invalid_input, not_found, conflict, ...")
    message: str = Field(..., description="What is wrong and how to fix it.")
    status: int = Field(..., description="The HTTP status, again.")
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: str | None = Field(None, description="OpenAI's name for type (the same value).")
    retry_after: float | None = Field(None, description="With 503 overloaded: seconds to wait before retrying.")

    class Config:
        schema_extra = staticmethod(nullable_optionals)


class ErrorBody(BaseModel):
    """Every error answer, whatever the route (jaseci walkers receive it as the action's result)."""

    error: ErrorDetail


class NotReadyBody(ErrorBody):
    """/readyz while no model is loaded."""

    startup: str = Field(..., description="idle, loading, loaded or failed.")


# ------------------------------------------------------------------ the jaseci actions' bodies
# What each action takes, as the engine checks it: the named parameters, and for an action with
# **kwargs its options, given flat or inside "**kwargs" (as jaseci's hook sends them). These models
# only describe the bodies (routes_actions.action_schema); the engine validates, with its own messages.
class Open(BaseModel):
    class Config:
        extra = Extra.allow
        schema_extra = staticmethod(nullable_optionals)


class EmptyText(ConstrainedStr):
    strict = True
    max_length = 0


# llm.generate takes "" as no prompt (beside messages); the /v1 bodies say null instead.
ActionPrompt = Union[NonBlank, EmptyText, conlist(NonBlank, min_items=1)]


class ActionMessage(Open):
    """A chat turn as llm.generate reads it (other keys are ignored)."""

    role: Role
    content: StrictText


class GenerateOptions(GenerateBody):
    """The options of llm.generate (its "**kwargs"; prompt is a parameter of its own)."""

    class Config:
        schema_extra = staticmethod(nullable_optionals)

    chat: StrictBool | None = Field(False, description="Wrap prompt in the model's chat template.")
    messages: list[ActionMessage] | None = Field(None, description="Chat turns [{role, content}], instead of "
                                                                  "prompt.", min_items=1)
    json_schema: Union[StrictDict, Literal[True]] | None = Field(
        None, description="Constrain the answer to JSON of this schema (true or {}: any JSON object).")
    logprobs: Union[StrictBool, bounded(int, ge=0, le=20)] | None = Field(
        None, description="Report log-probabilities (an integer: with that many alternatives).")
    top_logprobs: bounded(int, ge=0, le=20) | None = Field(None, description="Alternatives per token with logprobs.")


class GenerateParams(Strict):
    prompt: ActionPrompt | None = Field(None, description="A prompt, or a list of prompts (\"\" or null with "
                                                          "messages).")


class SetupOptions(Strict):
    tokenizer_kwargs: StrictDict | None = Field(None, description="Keyword arguments of the tokenizer's "
                                                                  "from_pretrained.")
    model_kwargs: StrictDict | None = Field(None, description="Keyword arguments of the model's from_pretrained.")
    device: StrictText | None = Field(None, description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    quantize: Literal["auto", "none", "int8", "int4"] | None = None
    adapters: dict[AdapterName, NonBlank] | None = Field(None, description="Adapters to load with the model, "
                                                                            "{name: folder}.",
                                                         propertyNames={"pattern": NAME_RE.pattern})


# A path, or "" for none (setup's names are paths; "" leaves one out, as null does).
PathOrEmpty = Union[NonBlank, EmptyText]


class SetupParams(Strict):
    model_name: PathOrEmpty | None = Field(None, description="A model folder or .gguf file (inside the data root "
                                                             "when the server has one); everything omitted: the "
                                                             "last setup again.")
    lora_dir: PathOrEmpty | None = Field(None, description="An adapter folder to load as the default adapter.")
    tokenizer_name: PathOrEmpty | None = Field(None, description="Another tokenizer folder.")


class TrainOptions(TrainFields):
    """llm.train's options. A multi-node run also takes nnodes, node_rank, master_addr and master_port, whose
    rules bind them to each other (docs/training.md); they are left out here."""

    background: StrictBool | None = Field(None, description="Run as a job and answer its id at once.")


class TrainParams(Strict):
    data_file: NonBlank
    output_dir: NonBlank
    training_params: StrictDict | None = None
    resume_from_checkpoint: Union[StrictBool, NonBlank] = False


class ExportParams(Strict):
    adapter: NonBlank
    output_dir: NonBlank
    format: Literal[EXPORT_FORMATS] = "gguf"


class ExportOptions(Strict):
    quantization: Union[StrictText, list[StrictText]] | None = None
    name: ExportName | None = None
    overwrite: StrictBool = False
    system_prompt: StrictText | None = None


class EvaluateOptions(Strict):
    batch_size: bounded(int, ge=1) | None = None
    cutoff_len: bounded(int, ge=1) | None = None
    data_format: StrictText | None = None
    prompt_template: StrictText | None = None
    train_on_inputs: StrictBool | None = None


class EvaluateParams(Strict):
    data_file: NonBlank
    adapter: StrictText | None = None


class AugmentOptions(Strict):
    fields: list[StrictText] | None = None
    rate: bounded(float, gt=0, le=1) | None = None
    data_format: StrictText | None = None


class AugmentParams(Strict):
    data_file: NonBlank
    output_file: NonBlank
    methods: conlist(Literal["synonym", "shuffle", "paraphrase"], min_items=1) | None = None
    copies: bounded(int, ge=1) = 1
    seed: StrictInt = 0
    adapter: StrictText | None = None


class SelectOptions(Strict):
    max_new_tokens: bounded(int, ge=1) | None = None
    batch_size: bounded(int, ge=1) | None = None
    prompt_template: StrictText | None = None


class SelectParams(Strict):
    data_file: NonBlank
    k: bounded(int, ge=1) = 10
    strategy: Literal["entropy", "perplexity"] = "entropy"
    adapter: StrictText | None = None
    output_file: NonBlank | None = None


class LoadAdapterParams(Strict):
    path: NonBlank
    name: AdapterName | None = None
    make_default: StrictBool | None = False


class AdapterNameParams(Strict):
    name: StrictText


class DefaultAdapterParams(Strict):
    name: StrictText | None = None


class JobParams(Strict):
    job_id: StrictText


class NoParams(Strict):
    pass


# action -> (its named parameters, its options or None when it takes no **kwargs)
ACTION_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel] | None]] = {
    "setup": (SetupParams, SetupOptions),
    "generate": (GenerateParams, GenerateOptions),
    "train": (TrainParams, TrainOptions),
    "evaluate": (EvaluateParams, EvaluateOptions),
    "export": (ExportParams, ExportOptions),
    "load_adapter": (LoadAdapterParams, None),
    "unload_adapter": (AdapterNameParams, None),
    "list_adapters": (NoParams, None),
    "set_default_adapter": (DefaultAdapterParams, None),
    "job_status": (JobParams, None),
    "cancel_job": (JobParams, None),
    "list_jobs": (NoParams, None),
    "model_info": (NoParams, None),
    "augment": (AugmentParams, AugmentOptions),
    "select_informative": (SelectParams, SelectOptions),
}
