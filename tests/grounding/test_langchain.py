"""LangChain integration: the standard ``langchain-tests`` suites for the chat model and the tools, and our own
checks against independent computations (greedy decoding by its definition, the Gemma chat template written
out by hand, the gapminder CSV for the numbers).

The chat model runs a tiny random Gemma 3 saved as a Hugging Face directory (loaded through
``models.load_model`` like a real checkpoint). Its control-token embedding rows are zero, so (tied head)
their logits are 0 while some of the ~60 random logits are positive at every step: greedy decoding never
emits them and every answer is non-empty text, as the standard suites require.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from gapminder_truth import gapminder
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_tests.integration_tests import ChatModelIntegrationTests, ToolsIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests, ToolsUnitTests

from grounding.answer import Answer
from grounding.langchain import (
    ChatGemma,
    ChatGemmaError,
    StatisticsRetriever,
    StatPointTool,
    StatTableTool,
    format_tables,
    messages_to_turns,
    rag_chain,
    rig_chain,
    rig_grounder,
    statistics_tools,
)
from grounding.sources import open_source

SPECIAL_PIECES = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
NORMAL_PIECES = list("\u2581abcdefghijklmnopqrstuvwxyz0123456789.,?") + ["\u2581t", "he", "\u2581the", "you", "\u2581you"]


@functools.cache
def tiny_checkpoint() -> str:
    """A tiny random Gemma 3 checkpoint directory: config.json, model.safetensors, tokenizer.json."""
    from safetensors.torch import save_file

    from models.config import GemmaConfig
    from models.gemma import GemmaLM
    from models.loading import init_random_weights
    from models.tokenizer import CONTROL, NORMAL, UNKNOWN, tokenizer_from_vocabulary

    directory = Path(tempfile.mkdtemp(prefix="tiny-chat-gemma-"))
    pieces = SPECIAL_PIECES + NORMAL_PIECES
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL] + [NORMAL] * len(NORMAL_PIECES)
    tokenizer_from_vocabulary(pieces, types, bos_id=2).save(str(directory / "tokenizer.json"))
    config = GemmaConfig(architecture="gemma3", vocab_size=len(pieces), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=512, query_pre_attn_scalar=32, sliding_window=8)
    model = init_random_weights(GemmaLM(config), seed=3, std=0.02)
    with torch.no_grad():
        model.model.embed_tokens.weight[:len(SPECIAL_PIECES)] = 0
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return str(directory)


CHAT_PARAMS = {"model": "tiny-gemma"}

# The standard suites hold async tests; pytest-asyncio runs them when marked (the project runs in its strict
# mode). The mark on a class also reaches its sync tests, where pytest-asyncio only warns: silenced.
async_suite = [pytest.mark.asyncio,
               pytest.mark.filterwarnings("ignore:.*marked with '@pytest.mark.asyncio':pytest.PytestWarning")]


def with_async_tests(cls):
    for mark in async_suite:
        cls = mark(cls)
    return cls


class TestChatGemmaUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatGemma

    @property
    def chat_model_params(self):
        return {**CHAT_PARAMS, "checkpoint": tiny_checkpoint()}


@with_async_tests
class TestChatGemmaIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatGemma

    @property
    def chat_model_params(self):
        return {**CHAT_PARAMS, "checkpoint": tiny_checkpoint()}

    @property
    def standard_chat_model_params(self):
        return {"max_tokens": 8}  # short answers keep the suite fast; the content is random text anyway

    @property
    def returns_usage_metadata(self) -> bool:
        return True


# -- our own checks of the chat model ------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded():
    from models import load_model, load_tokenizer

    return load_model(tiny_checkpoint()).eval(), load_tokenizer(tiny_checkpoint())


def greedy_by_definition(model, tokenizer, prompt_text: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids): full forward over the whole sequence each step, argmax, no cache."""
    ids = tokenizer.encode(prompt_text, add_bos=True)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token in tokenizer.stop_token_ids:
                break
            out.append(token)
    return ids, out


def test_chat_template_written_out_and_greedy_parity(loaded):
    model, tokenizer = loaded
    chat = ChatGemma(gemma=model, tokenizer=tokenizer, max_tokens=10)
    messages = [SystemMessage("Be brief."), HumanMessage("hello"), AIMessage("hi there"), HumanMessage("how are you")]
    # The Gemma chat format, written out by hand (system text joins the first user turn).
    expected_prompt = ("<start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n<start_of_turn>model\nhi there<end_of_turn>\n"
                       "<start_of_turn>user\nhow are you<end_of_turn>\n<start_of_turn>model\n")
    assert tokenizer.apply_chat_template(messages_to_turns(messages)) == expected_prompt
    prompt_ids, new_ids = greedy_by_definition(model, tokenizer, expected_prompt, 10)
    result = chat.invoke(messages)
    assert result.content == tokenizer.decode(new_ids) and len(result.content) > 0
    assert result.usage_metadata == {"input_tokens": len(prompt_ids), "output_tokens": len(new_ids),
                                     "total_tokens": len(prompt_ids) + len(new_ids)}
    assert result.response_metadata["finish_reason"] == "length" and result.response_metadata["model_name"] == "gemma"
    # Streaming gives the same text in several pieces, usage once on the last chunk.
    chunks = list(chat.stream(messages))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == result.content
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1 and chunks[-1].chunk_position == "last"


def test_stop_strings_and_per_call_settings(loaded):
    model, tokenizer = loaded
    chat = ChatGemma(gemma=model, tokenizer=tokenizer, max_tokens=12)
    full = chat.invoke("hi").content
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if full.find(full[i:i + 2]) == i)
    assert full.find(stop) > 0
    cut = chat.invoke("hi", stop=[stop])
    assert cut.content == full[:full.find(stop)] and cut.response_metadata["finish_reason"] == "stop"
    assert ChatGemma(gemma=model, tokenizer=tokenizer, max_tokens=12, stop=[stop]).invoke("hi").content == cut.content
    assert "".join(c.content for c in chat.stream("hi", stop=[stop])) == cut.content
    short = chat.invoke("hi", max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3 and full.startswith(short.content)
    # Sampling with a seed is reproducible and differs from greedy on a random model.
    sampled = [chat.invoke("hi", temperature=1.5, seed=7).content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_message_conversion_rules_and_errors():
    turns = messages_to_turns([SystemMessage("a"), SystemMessage("b"), HumanMessage("c"), HumanMessage("d"),
                               AIMessage("e"), AIMessage("f"), ToolMessage("42", tool_call_id="call1"),
                               SystemMessage("g")])
    assert turns == [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "c\n\nd"},
                     {"role": "model", "content": "e\n\nf"},
                     {"role": "user", "content": "Result of the tool call call1:\n42\n\ng"}]
    assert messages_to_turns([SystemMessage("only instructions")]) == [{"role": "user", "content": "only instructions"}]
    with pytest.raises(ChatGemmaError, match="starts with an AI message"):
        messages_to_turns([AIMessage("x"), HumanMessage("y")])
    with pytest.raises(ChatGemmaError, match="text only"):
        messages_to_turns([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:,"}}])])
    with pytest.raises(ValueError, match="checkpoint="):  # pydantic's ValidationError is a ValueError
        ChatGemma()


# -- tools ---------------------------------------------------------------------------------------


@functools.cache
def local_source():
    return open_source("local")


class PointToolParams:
    @property
    def tool_constructor(self):
        return StatPointTool

    @property
    def tool_constructor_params(self):
        return {"source": local_source()}

    @property
    def tool_invoke_params_example(self):
        return {"query": "life expectancy in Kenya in 2007"}


class TableToolParams(PointToolParams):
    @property
    def tool_constructor(self):
        return StatTableTool

    @property
    def tool_invoke_params_example(self):
        return {"query": "How has life expectancy changed in Japan?"}


class TestPointToolUnit(PointToolParams, ToolsUnitTests):
    pass


@with_async_tests
class TestPointToolIntegration(PointToolParams, ToolsIntegrationTests):
    pass


class TestTableToolUnit(TableToolParams, ToolsUnitTests):
    pass


@with_async_tests
class TestTableToolIntegration(TableToolParams, ToolsIntegrationTests):
    pass


def test_tools_give_the_source_numbers_and_typed_arguments():
    point, table = statistics_tools(local_source())
    message = point.invoke({"name": point.name, "args": {"query": "life expectancy in Kenya in 2007"},
                            "id": "1", "type": "tool_call"})
    assert message.artifact["result"]["value"] == gapminder("Kenya", 2007, "lifeExp")
    assert "54.11" in message.content and "Gapminder" in message.content
    rows = table.invoke({"name": table.name, "args": {"query": "How has life expectancy changed in Japan?"},
                         "id": "2", "type": "tool_call"})
    assert f"{gapminder('Japan', 1952, 'lifeExp'):g}" in rows.content
    assert rows.artifact["mode"] == "table" and len(rows.artifact["result"]["rows"]) == 12  # 1952..2007 every 5 years
    assert "No data" in point.invoke({"query": "number of dragons on Mars"})
    assert point.args_schema.model_json_schema()["properties"]["query"]["type"] == "string"
    with pytest.raises(Exception, match="query"):
        point.invoke({"question": "wrong argument name"})
    with pytest.raises(TypeError, match="StatSource"):
        StatPointTool(source="local")


def test_tool_reports_a_failing_source_to_the_model():
    from grounding.types import TransientError

    class Down:
        name = "down"

        def point(self, query):
            raise TransientError("connection refused")

        def table(self, query):
            raise TransientError("connection refused")

    message = StatPointTool(source=Down()).invoke({"name": "statistics_point_lookup", "args": {"query": "x"},
                                                   "id": "9", "type": "tool_call"})
    assert message.status == "error" and "connection refused" in message.content


# -- RAG and RIG in LCEL chains ------------------------------------------------------------------
def test_rag_chain_retriever_prompt_model(loaded):
    model, tokenizer = loaded
    chat = ChatGemma(gemma=model, tokenizer=tokenizer, max_tokens=6)
    retriever = StatisticsRetriever(source=local_source())
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the tables, citing [Table N]."),
                                               ("human", "{tables}\n\nQuestion: {question}")])
    chain = {"tables": retriever | format_tables, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()
    question = "How has life expectancy changed in Japan?"
    docs = retriever.invoke(question)
    assert [d.metadata["number"] for d in docs] == [1] and docs[0].metadata["source"] == "Gapminder"
    assert docs[0].metadata["attribution"].startswith("Data: Gapminder")  # to show with the model's answer
    assert f"{gapminder('Japan', 2007, 'lifeExp'):g}" in docs[0].page_content
    answer = chain.invoke(question)
    # The chain's answer is the model's answer to the prompt built from the retrieved table.
    by_hand = prompt.invoke({"tables": docs[0].page_content, "question": question})
    assert answer == chat.invoke(by_hand).content and len(answer) > 0
    assert len(retriever.invoke(question, k=1)) == 1
    # The packaged RAG flow as a Runnable: without a model it states the statistics and gives the tables.
    result = rag_chain(local_source()).invoke({"question": question})
    assert isinstance(result, Answer) and result.tables[0].table.rows[-1][-1] == gapminder("Japan", 2007, "lifeExp")
    # With a LangChain chat model as the answering model.
    scripted = GenericFakeChatModel(messages=iter([AIMessage("What is life expectancy in Japan?"),  # the questions
                                                   AIMessage("Up by 20 years [Table 1].")]))  # the answer
    with_model = rag_chain(local_source(), scripted).invoke(question)
    assert with_model.text == "Up by 20 years [Table 1]." and with_model.citations == [1]
    assert with_model.attribution == [docs[0].metadata["attribution"]]


def test_rig_chain_prompt_model_grounder():
    rig_text = 'Kenyans lived [__DC__("life expectancy in Kenya in 2007") --> "58 years"] on average.'
    model = GenericFakeChatModel(messages=iter([AIMessage(rig_text)]))
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model | rig_grounder(local_source())
    result = chain.invoke({"question": "How long did Kenyans live in 2007?"})
    (claim,) = result.claims
    assert claim.dc_value == gapminder("Kenya", 2007, "lifeExp") and claim.model_value == "58 years"
    assert claim.differs  # 58 is more than 5% above 54.11
    assert result.text.startswith("Kenyans lived [__DC__#1(54.11 years [1]* || 58 years)]")
    # The packaged RIG flow: question -> the model writes -> every number checked -> Answer.
    writer = GenericFakeChatModel(messages=iter([AIMessage(rig_text)]))
    answer = rig_chain(local_source(), writer).invoke("How long did Kenyans live in 2007?")
    assert isinstance(answer, Answer) and answer.mode == "rig" and answer.claims[0].dc_value == claim.dc_value
    assert answer.footnotes == result.footnotes and not answer.no_answer
