"""LangChain integration of the statistical grounding: a chat model over the native Gemma models, Data
Commons lookups as tools, and RIG / RAG as Runnables.

- :class:`ChatGemma`: a ``BaseChatModel`` over any checkpoint :func:`models.load_model` accepts (or an
  already loaded model + tokenizer). Messages are rendered with the Gemma chat template; stop strings,
  streaming and token usage (``usage_metadata``) are supported.
- :class:`StatPointTool` / :class:`StatTableTool` (or :func:`statistics_tools`): point and table lookups
  over any :class:`~grounding.types.StatSource` with typed (pydantic) arguments; the text goes to the
  model, the structured :class:`~grounding.types.Lookup` is the tool message's artifact.
- :class:`StatisticsRetriever`: statistics tables as ``Document`` objects, so the RAG flow composes in
  LCEL: ``{"tables": retriever | format_tables, "question": RunnablePassthrough()} | prompt | model``.
- :func:`rig_grounder` (the model's RIG text -> :class:`~grounding.rig.RIGResult`), and
  :func:`rag_chain` / :func:`rig_chain` (a question -> :class:`~grounding.answer.Answer`).
- The safety guard (:func:`models.load_guard`): :func:`safety_guard` passes its input through or raises /
  returns a refusal; :func:`guarded` puts a retriever, chat model or chain behind it (input and output screened).

Example::

    from grounding.langchain import ChatGemma, StatisticsRetriever, format_tables
    from grounding.rag import ANSWER_PROMPT
    chat = ChatGemma(checkpoint="path/to/gemma-3-1b-it", max_tokens=256)
    chain = ({"tables": StatisticsRetriever(source=open_source("local")) | format_tables,
              "question": RunnablePassthrough()}
             | PromptTemplate.from_template(ANSWER_PROMPT).partial(no_answer="[NO ANSWER]") | chat)
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from models.guard import GuardResult

from .types import LLM, DataSourceError, GroundingError, Lookup, StatSource

__all__ = [
    "ChatGemma", "ChatGemmaError", "messages_to_turns",
    "PointLookupInput", "TableLookupInput", "StatPointTool", "StatTableTool", "statistics_tools",
    "StatisticsRetriever", "format_tables", "rig_grounder", "rag_chain", "rig_chain", "as_grounding_llm",
    "safety_guard", "guarded", "Refusal", "GuardRefusal",
]


class ChatGemmaError(GroundingError, ValueError):
    """A conversation or setting the Gemma chat model cannot take (images, bad roles, no model)."""


# -- the chat model ------------------------------------------------------------------------------
# Loaded checkpoints, shared by every ChatGemma naming the same source (LangChain copies chat models
# freely: bind, with_config, model_copy), and one lock per model: its static KV cache serves one
# generation at a time, and LangChain's batch/abatch call the model from several threads.
_LOADED: dict[tuple, tuple[Any, Any]] = {}
_LOAD_LOCK = threading.Lock()
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_lock(model) -> threading.Lock:
    with _LOAD_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.Lock()
        return lock


def _load(checkpoint: str, tokenizer: str | None, dtype: str | None, device: str) -> tuple[Any, Any]:
    key = (checkpoint, tokenizer, dtype, device)
    with _LOAD_LOCK:
        if key not in _LOADED:
            from models import load_model, load_tokenizer

            _LOADED[key] = (load_model(checkpoint, dtype=dtype, device=device).eval(),
                            load_tokenizer(tokenizer or checkpoint))
        return _LOADED[key]


def _content_text(content: str | list, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ChatGemmaError(f"{where}: content block of type {kind!r}; the Gemma chat model takes text only")
    return "".join(texts)


def messages_to_turns(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> alternating ``user``/``model`` turns for the Gemma chat template.

    Gemma has no system role and needs strict alternation, so: the system messages before the first
    user turn are kept first (the template prepends them to that turn), a later system message joins
    the user turn it falls in, tool results are user turns, and consecutive turns of one role are
    joined with a blank line.
    """
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        text = _content_text(message.content, f"message {i} ({message.type})")
        role = {"human": "user", "ai": "model", "system": "system", "tool": "user", "function": "user"}.get(message.type)
        if role is None and message.type == "chat":
            role = {"assistant": "model", "ai": "model", "human": "user"}.get(message.role, message.role)
        if role not in ("user", "model", "system"):
            raise ChatGemmaError(f"message {i} has type {message.type!r}; use system, human, ai or tool messages")
        if message.type == "tool":
            text = f"Result of the tool call {getattr(message, 'tool_call_id', '')}:\n{text}"
        if role == "system" and any(t["role"] != "system" for t in turns):
            role = "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    if turns and turns[0]["role"] == "system" and (len(turns) == 1 or turns[1]["role"] != "user"):
        turns[0]["role"] = "user"  # instructions alone (or followed by the model) are the user's turn
        if len(turns) > 1 and turns[1]["role"] == "user":
            turns[0]["content"] += "\n\n" + turns.pop(1)["content"]
    if not turns:
        raise ChatGemmaError("no messages to answer")
    if turns[0]["role"] == "model":
        raise ChatGemmaError("the conversation starts with an AI message; Gemma conversations start with the user")
    return turns


class _Generation:
    """One generation: text pieces out, with the token counts and the reason it ended."""

    def __init__(self, model, tokenizer, prompt_ids: list[int], stop: Sequence[str], settings: dict):
        self.model, self.tokenizer, self.prompt_ids = model, tokenizer, prompt_ids
        self.stop, self.settings = [s for s in stop if s], settings
        self.output_tokens = 0
        self.finish_reason: Literal["stop", "length"] = "length"

    def pieces(self) -> Iterator[str]:
        from models.generate import TextStream, stream_ids

        text = TextStream(self.tokenizer, self.stop, self.settings["stop_token_ids"])
        with _model_lock(self.model):
            for step in stream_ids(self.model, [self.prompt_ids], **self.settings):
                if step[0] is None:
                    break
                self.output_tokens += 1
                piece = text.push(step[0])
                if piece:
                    yield piece
                if text.finished:
                    self.finish_reason = "stop"
                    return
        tail = text.flush()
        if tail:
            yield tail

    def usage(self) -> UsageMetadata:
        n_in = len(self.prompt_ids)
        return UsageMetadata(input_tokens=n_in, output_tokens=self.output_tokens, total_tokens=n_in + self.output_tokens)


class ChatGemma(BaseChatModel):
    """A LangChain chat model running this project's native Gemma models on the Gemma chat template.

    Give ``checkpoint`` (a Hugging Face directory, a ``.gguf`` file or a preset name; loaded on first use
    and shared between instances) or an already loaded ``gemma`` model and its ``tokenizer``.
    ``model`` names the model in traces and ``response_metadata["model_name"]`` (defaults to the
    checkpoint's name). Greedy at ``temperature=0``; ``max_tokens`` bounds each answer.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str | None = Field(default=None, alias="model")
    checkpoint: str | None = None
    tokenizer_source: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    gemma: Any = Field(default=None, exclude=True)  # a loaded GemmaLM (instead of checkpoint)
    tokenizer: Any = Field(default=None, exclude=True)
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=256, ge=1)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    streaming: bool = False  # invoke() streams through _stream (callbacks see each piece)
    _resolved: tuple | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_source(self) -> ChatGemma:
        if self.gemma is None and not self.checkpoint:
            raise ChatGemmaError("ChatGemma needs checkpoint= (a checkpoint directory, .gguf file or preset name) "
                                 "or gemma= (a loaded model) with tokenizer=")
        if self.gemma is not None and self.tokenizer is None:
            raise ChatGemmaError("ChatGemma(gemma=...) also needs tokenizer= (models.load_tokenizer(...))")
        if self.model_name is None:
            self.model_name = str(self.checkpoint).rstrip("/").rsplit("/", 1)[-1] if self.checkpoint else "gemma"
        return self

    @property
    def _llm_type(self) -> str:
        return "gemma-native"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "checkpoint": self.checkpoint, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "gemma_grounding"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        if self.gemma is not None:
            return self.gemma, self.tokenizer
        return _load(self.checkpoint, self.tokenizer_source, self.dtype, self.device)

    def _start(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> _Generation:
        model, tokenizer = self.model_and_tokenizer()
        prompt = tokenizer.apply_chat_template(messages_to_turns(messages), add_generation_prompt=True)
        settings = dict(max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
                        temperature=kwargs.get("temperature", self.temperature),
                        top_k=kwargs.get("top_k", self.top_k), top_p=kwargs.get("top_p", self.top_p),
                        seed=kwargs.get("seed", self.seed),
                        stop_token_ids=list(getattr(tokenizer, "stop_token_ids", None) or model.config.eos_token_ids))
        stops = list(stop if stop is not None else (self.stop or []))
        return _Generation(model, tokenizer, tokenizer.encode(prompt, add_bos=True), stops, settings)

    def _metadata(self, generation: _Generation, kwargs: dict) -> dict[str, Any]:
        return {"model_name": kwargs.get("model") or self.model_name, "model_provider": "gemma_grounding",
                "finish_reason": generation.finish_reason}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        generation = self._start(messages, stop, kwargs)
        text = "".join(generation.pieces())
        message = AIMessage(content=text, usage_metadata=generation.usage(),
                            response_metadata=self._metadata(generation, kwargs))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        generation = self._start(messages, stop, kwargs)
        for piece in generation.pieces():
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        # Usage and metadata once, on the closing chunk (summing chunks must not double count).
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata=generation.usage(), response_metadata=self._metadata(generation, kwargs),
            chunk_position="last"))


# -- Data Commons tools ------------------------------------------------------------------------------
class PointLookupInput(BaseModel):
    """Arguments of the point lookup tool."""

    query: str = Field(min_length=1, max_length=500,
                       description="one statistic of one place in plain words, e.g. "
                                   "'life expectancy in Kenya in 2007' or 'population of Brazil'")


class TableLookupInput(BaseModel):
    """Arguments of the table lookup tool."""

    query: str = Field(min_length=1, max_length=500,
                       description="a statistic over places or time in plain words, e.g. "
                                   "'GDP per capita of countries in Africa' or 'How has life expectancy changed in Japan?'")


class _StatTool(BaseTool):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: Any  # a grounding.types.StatSource
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool = True  # a failed lookup is reported to the model, not raised into the agent

    @model_validator(mode="after")
    def _check_source(self):
        if not isinstance(self.source, StatSource):
            raise TypeError(f"source must be a grounding StatSource (open_source(...)), got {type(self.source).__name__}")
        return self

    def _lookup(self, query: str, mode: Literal["point", "table"]) -> Lookup:
        try:
            result = self.source.point(query) if mode == "point" else self.source.table(query)
        except DataSourceError as e:
            raise ToolException(f"{self.source.name} lookup failed for {query!r}: {type(e).__name__}: {e}") from e
        return Lookup(query=query, mode=mode, result=result)


class StatPointTool(_StatTool):
    """One value for a statistical query, as a sentence with its source; the artifact is the Lookup."""

    name: str = "statistics_point_lookup"
    description: str = ("Look up one statistic (a single number) for one place, e.g. 'life expectancy in Kenya in "
                        "2007'. Returns the value with its unit, date and source, or says there is no data.")
    args_schema: type[BaseModel] = PointLookupInput

    def _run(self, query: str, run_manager: Any = None) -> tuple[str, dict]:
        from .answer import state_plainly

        lookup = self._lookup(query, "point")
        if lookup.result is None:
            return f"No data in {self.source.name} for {query!r}.", lookup.model_dump()
        return state_plainly(lookup.result), lookup.model_dump()


class StatTableTool(_StatTool):
    """A table for a statistical query, rendered as text; the artifact is the Lookup."""

    name: str = "statistics_table_lookup"
    description: str = ("Look up a table of statistics for a query over several places or years, e.g. 'population "
                        "of countries in Europe'. Returns the table as text with its source, or says there is no data.")
    args_schema: type[BaseModel] = TableLookupInput

    def _run(self, query: str, run_manager: Any = None) -> tuple[str, dict]:
        from .rag import render_table

        lookup = self._lookup(query, "table")
        if lookup.result is None:
            return f"No table in {self.source.name} for {query!r}.", lookup.model_dump()
        return render_table(1, lookup.result), lookup.model_dump()


def statistics_tools(source: StatSource | str | None = None) -> list[BaseTool]:
    """The point and table lookup tools over ``source`` (a StatSource or an :func:`open_source` kind)."""
    if source is None or isinstance(source, str):
        from .sources import open_source

        source = open_source(source)
    return [StatPointTool(source=source), StatTableTool(source=source)]


# -- RAG: statistics tables as documents ---------------------------------------------------------------
class StatisticsRetriever(BaseRetriever):
    """Tables for a question, as Documents (``page_content`` = the numbered table as text).

    Without ``question_llm`` the question itself is looked up; with one (a grounding LLM or a LangChain
    chat model) it first writes DataGemma's statistical questions, each fetched as a table. ``k`` bounds
    the number of tables. Metadata: ``number`` (for ``[Table N]`` citations), ``title``, ``query``,
    ``source``, ``url``, ``unit``, ``attribution`` (the line the source asks to be shown with its numbers).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: Any
    question_llm: Any = None
    k: int = Field(default=8, ge=1, le=25)
    max_workers: int = Field(default=8, ge=1)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        from .rag import RAG

        k = int(kwargs.get("k", self.k))
        llm = as_grounding_llm(self.question_llm) if self.question_llm is not None else None
        _questions, tables, _errors = RAG(self.source, llm, max_questions=k, max_workers=self.max_workers).retrieve(query)
        return [
            Document(page_content=t.text, metadata={
                "number": t.number, "title": t.table.title, "query": t.table.query, "unit": t.table.unit,
                "source": t.table.source.name if t.table.source else None,
                "url": t.table.url or (t.table.source.url if t.table.source else None),
                "attribution": t.table.attribution})
            for t in tables[:k]
        ]


def format_tables(documents: Sequence[Document]) -> str:
    """The tables of :class:`StatisticsRetriever` as one text block for a prompt (blank line between)."""
    return "\n\n".join(d.page_content for d in documents)


# -- RIG / RAG as Runnables ----------------------------------------------------------------------------
def as_grounding_llm(llm) -> LLM:
    """A grounding :class:`~grounding.types.LLM` from a LangChain chat model (or one already)."""
    if isinstance(llm, BaseChatModel):
        from .llm import LangChainLLM

        return LangChainLLM(llm)
    if isinstance(llm, LLM):
        return llm
    raise TypeError(f"expected a LangChain chat model or a grounding LLM, got {type(llm).__name__}")


def _text_of(value) -> str:
    if isinstance(value, BaseMessage):
        return _content_text(value.content, "model output")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected model text (str or AI message), got {type(value).__name__}")


def _question_of(value) -> str:
    if isinstance(value, dict):
        value = value.get("question")
    if not isinstance(value, str) or not value.strip():
        raise ValueError("the input must be a question string or {'question': ...}")
    return value


def rig_grounder(source: StatSource, *, max_workers: int = 8) -> Runnable:
    """A Runnable: the text a RIG model wrote (str or AI message) -> :class:`~grounding.rig.RIGResult`,
    every ``[__DC__("query") --> "value"]`` checked against ``source``. Use as ``prompt | model | grounder``."""
    from .rig import ground_text

    return RunnableLambda(lambda text: ground_text(_text_of(text), source, max_workers=max_workers),
                          name="rig_grounder")


def rag_chain(source: StatSource, llm=None, *, max_new_tokens: int = 512) -> Runnable:
    """A Runnable: question (str or ``{"question": ...}``) -> :class:`~grounding.answer.Answer` by RAG.
    ``llm`` is a LangChain chat model or a grounding LLM; None states the retrieved statistics plainly."""
    from .answer import ask

    model = as_grounding_llm(llm) if llm is not None else None
    return RunnableLambda(lambda q: ask(_question_of(q), mode="rag", source=source, llm=model,
                                        max_new_tokens=max_new_tokens), name="rag_chain")


def rig_chain(source: StatSource, llm=None, *, interleaved: bool = False, max_new_tokens: int = 512) -> Runnable:
    """A Runnable: question -> :class:`~grounding.answer.Answer` by RIG (the model's numbers checked)."""
    from .answer import ask

    model = as_grounding_llm(llm) if llm is not None else None
    return RunnableLambda(lambda q: ask(_question_of(q), mode="rig", source=source, llm=model,
                                        interleaved=interleaved, max_new_tokens=max_new_tokens), name="rig_chain")


# -- the safety guard as Runnables -------------------------------------------------------------------
class Refusal(BaseModel):
    """What a guard Runnable gives instead of a flagged input (or output): the refusal text and the scores."""

    text: str
    result: GuardResult


class GuardRefusal(GroundingError):
    """Raised by a guard Runnable with ``on_flag="raise"``; ``refusal`` holds the text and the scores."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.text)
        self.refusal = refusal


def _screened_input(value, key: str) -> str:
    """The text a guard screens in a chain's input: a string, ``value[key]``, a message, or the last human
    message of a conversation / chat prompt value."""
    if isinstance(value, PromptValue):
        value = value.to_messages()
    if isinstance(value, dict):
        if key not in value:
            raise ValueError(f"the guard screens input[{key!r}], but the input has keys {sorted(value)}")
        value = value[key]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, BaseMessage) for m in value):
        human = [m for m in value if m.type == "human"]
        value = (human or list(value))[-1]
    if isinstance(value, BaseMessage):
        return _content_text(value.content, "guarded message")
    if isinstance(value, str):
        return value
    raise TypeError(f"the guard screens text: a str, {{{key!r}: str}}, messages or a prompt value, "
                    f"got {type(value).__name__}")


def _screened_output(value) -> str:
    if isinstance(value, (list, tuple)) and all(isinstance(d, Document) for d in value):
        return "\n\n".join(d.page_content for d in value)
    if isinstance(value, BaseModel) and isinstance(getattr(value, "text", None), str):
        return value.text  # a grounding Answer
    return _text_of(value)


def _refuse(result: GuardResult, on_flag: str):
    from .guard import refusal_text

    refusal = Refusal(text=refusal_text(result), result=result)
    if on_flag == "raise":
        raise GuardRefusal(refusal)
    return refusal


def _check_on_flag(on_flag: str) -> None:
    if on_flag not in ("raise", "return"):
        raise ValueError(f"on_flag must be 'raise' or 'return', got {on_flag!r}")


def safety_guard(guard, *, on_flag: Literal["raise", "return"] = "raise", key: str = "question") -> Runnable:
    """A Runnable that passes its input through unchanged when the guard does not flag it; a flagged input
    raises :class:`GuardRefusal` (``on_flag="raise"``, so ``safety_guard(g) | retriever`` stops there) or
    becomes a :class:`Refusal` (``"return"``; see :func:`guarded` to skip the rest of a chain).

    ``guard``: :func:`models.load_guard` (a :class:`models.guard.SafetyGuard`). The screened text is the
    input string, ``input[key]``, or the last human message of a conversation or chat prompt value.
    """
    from .guard import screen

    _check_on_flag(on_flag)

    def check(value):
        result = screen(guard, _screened_input(value, key))
        return _refuse(result, on_flag) if result.flagged else value

    return RunnableLambda(check, name="safety_guard")


def guarded(runnable: Runnable, guard, *, on_flag: Literal["raise", "return"] = "return", key: str = "question",
            screen_output: bool = True) -> Runnable:
    """``runnable`` behind the guard: a flagged input never reaches it (a :class:`Refusal` is returned, or
    :class:`GuardRefusal` raised); with ``screen_output`` its output (text, AI message, documents or an
    :class:`~grounding.answer.Answer`) is screened as the response to the input and refused when flagged.
    Works in front of a retriever, a chat model or a whole chain."""
    from .guard import screen

    _check_on_flag(on_flag)

    def run(value, config: RunnableConfig):
        question = _screened_input(value, key)
        result = screen(guard, question)
        if result.flagged:
            return _refuse(result, on_flag)
        output = runnable.invoke(value, config)
        if screen_output:
            result = screen(guard, question, _screened_output(output))
            if result.flagged:
                return _refuse(result, on_flag)
        return output

    return RunnableLambda(run, name=f"guarded({runnable.get_name()})")
