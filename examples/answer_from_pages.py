"""Multimodal RAG: find the pages that answer a question with ColPali, then read them with PaliGemma.

    .venv/bin/python examples/answer_from_pages.py                         # sample PDFs, tiny random models
    .venv/bin/python examples/answer_from_pages.py --pdfs ~/scans --colpali path/to/colpali-v1.3-merged \\
        --paligemma path/to/paligemma2-3b-mix-448 "What is the total due on the invoice?"

Retrieval: the question is embedded by ColPali and matched against every page image (late interaction).
Reading: the best pages are shown to PaliGemma with the ``answer en {question}`` prompt, one page at a
time; each answer is printed with the page it came from. Without checkpoints, tiny *random* models are
written and used: every step runs, the answers are noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sample_data  # noqa: E402

from models import load_model, load_tokenizer  # noqa: E402
from models.vlm_tasks import answer  # noqa: E402
from vision_rag import Index, index_paths  # noqa: E402
from vision_rag.colpali import ColPaliEmbedder  # noqa: E402
from vision_rag.langchain import PageRetriever, page_image  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default="What is the total due on the invoice?")
    parser.add_argument("--pdfs", help="folder of PDFs / scans (default: two generated sample PDFs)")
    parser.add_argument("--colpali", help="ColPali checkpoint directory (default: tiny random)")
    parser.add_argument("--paligemma", help="PaliGemma checkpoint directory, e.g. a -mix- model (default: tiny random)")
    parser.add_argument("--pages", type=int, default=2, help="how many retrieved pages PaliGemma reads")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="answer-from-pages-"))
    folder = Path(args.pdfs) if args.pdfs else sample_data.write_sample_pdfs(work / "pdfs")[0].parent
    embedder = ColPaliEmbedder.load(args.colpali or sample_data.write_tiny_colpali(work / "tiny-colpali"))
    paligemma_dir = args.paligemma or sample_data.write_tiny_paligemma(work / "tiny-paligemma")
    reader, reader_tokenizer = load_model(paligemma_dir), load_tokenizer(paligemma_dir)

    # 1. Retrieval: index the pages and take the best ones for the question.
    with Index.open(work / "index", create=True, model_id=embedder.model_id, dim=embedder.dim) as index:
        index_paths(index, embedder, [folder], progress=False)
        documents = PageRetriever(index=index, embedder=embedder, k=args.pages).invoke(args.question)

    # 2. Reading: PaliGemma looks at each retrieved page image and answers from it.
    print(f"question: {args.question}\n")
    for rank, doc in enumerate(documents, 1):
        meta = doc.metadata
        image = page_image(meta, dpi=100)
        reply = answer(reader, reader_tokenizer, image, args.question, max_new_tokens=args.max_new_tokens)
        print(f"{rank}. {Path(meta['source']).name} p.{meta['page_number'] + 1} (score {meta['score']:.3f})")
        print(f"   page text: {doc.page_content.splitlines()[0]!r}")
        print(f"   PaliGemma: {reply!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
