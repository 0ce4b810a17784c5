"""LangChain (LCEL) chains built from this project's parts: our page retriever, a prompt, our chat model.

    .venv/bin/python examples/langchain_chain.py                              # sample PDFs, tiny random models
    .venv/bin/python examples/langchain_chain.py --chat-model path/to/gemma-3-1b-it \\
        --colpali path/to/colpali-v1.3-merged --pdfs ~/scans "What is the total due on the invoice?"

1. Documents: ``PageRetriever`` (ColPali over a vision_rag index) | the pages' text | prompt | ``ChatGemma``.
2. Statistics: ``StatisticsRetriever`` (tables from the embedded Gapminder store) | prompt | ``ChatGemma``,
   and the same RAG flow packaged as one Runnable (``rag_chain``) returning a grounded, cited answer.

``ChatGemma`` runs a native Gemma checkpoint (directory, .gguf or preset) on the Gemma chat template,
streams, honours stop strings and reports token usage. Without ``--chat-model`` a tiny *random* Gemma is
used: the chain runs end to end, its text is noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sample_data  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402

from grounding.langchain import ChatGemma, StatisticsRetriever, format_tables, rag_chain  # noqa: E402
from grounding.sources import open_source  # noqa: E402
from vision_rag import Index, index_paths  # noqa: E402
from vision_rag.colpali import ColPaliEmbedder  # noqa: E402
from vision_rag.langchain import PageRetriever  # noqa: E402


def format_pages(documents) -> str:
    return "\n\n".join(f"[{Path(d.metadata['source']).name} p.{d.metadata['page_number'] + 1}]\n{d.page_content}"
                       for d in documents)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default="What is the total due on the invoice?")
    parser.add_argument("--chat-model", help="Gemma checkpoint directory, .gguf file or preset (default: tiny random)")
    parser.add_argument("--colpali", help="ColPali checkpoint directory (default: tiny random)")
    parser.add_argument("--pdfs", help="folder of PDFs / scans (default: two generated sample PDFs)")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="langchain-chain-"))
    folder = Path(args.pdfs) if args.pdfs else sample_data.write_sample_pdfs(work / "pdfs")[0].parent
    embedder = ColPaliEmbedder.load(args.colpali or sample_data.write_tiny_colpali(work / "tiny-colpali"))
    chat_model = ChatGemma(checkpoint=str(args.chat_model or sample_data.write_tiny_gemma(work / "tiny-gemma")),
                           max_tokens=args.max_tokens)
    with Index.open(work / "index", create=True, model_id=embedder.model_id, dim=embedder.dim) as index:
        index_paths(index, embedder, [folder], progress=False)

    # 1. retriever | prompt | model over the page index.
    retriever = PageRetriever(index=str(work / "index"), embedder=embedder, k=2)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer the question from the document pages below. Name the page you used."),
        ("human", "{pages}\n\nQuestion: {question}"),
    ])
    chain = {"pages": retriever | format_pages, "question": RunnablePassthrough()} | prompt | chat_model
    print(f"question: {args.question}")
    for doc in retriever.invoke(args.question):
        print(f"  retrieved {Path(doc.metadata['source']).name} p.{doc.metadata['page_number'] + 1} "
              f"(score {doc.metadata['score']:.3f})")
    message = chain.invoke(args.question)
    print(f"answer: {message.content!r}\n  usage: {message.usage_metadata}")
    print("streamed: ", end="")
    for chunk in (chain | StrOutputParser()).stream(args.question):
        print(chunk, end="", flush=True)
    print("\n")

    # 2. The statistical RAG flow in LCEL, then packaged as one Runnable.
    source = open_source("local")
    stats_question = "How has life expectancy changed in Japan?"
    stats_prompt = ChatPromptTemplate.from_messages([
        ("human", "Answer from these tables, citing [Table N].\n\n{tables}\n\nQuestion: {question}")])
    stats_chain = ({"tables": StatisticsRetriever(source=source) | format_tables, "question": RunnablePassthrough()}
                   | stats_prompt | chat_model | StrOutputParser())
    print(f"statistics question: {stats_question}\n  model: {stats_chain.invoke(stats_question)!r}")
    grounded = rag_chain(source).invoke(stats_question)  # no model: the tables stated plainly, cited
    print(f"  grounded (no model): {grounded.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
