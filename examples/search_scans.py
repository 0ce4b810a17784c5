"""Index a folder of PDFs with ColPali and search it — the pages are compared as images, no OCR.

    .venv/bin/python examples/search_scans.py                                   # sample PDFs, tiny random ColPali
    .venv/bin/python examples/search_scans.py --pdfs ~/scans --colpali path/to/colpali-v1.3-merged \\
        --index ~/scans-index "invoice total due" "revenue chart"

Without ``--colpali`` a tiny *random* ColPali is written and used: the code path is the real one, the
ranking is meaningless. With a real checkpoint (a merged ColPali directory; see ColPaliEmbedder.load for
base + LoRA adapter) the best page comes first. The index is a directory you can reopen and grow later;
`gemma-ground search --index DIR "query"` searches it from the shell.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sample_data  # noqa: E402

from vision_rag import Index, SearchFilter, index_paths  # noqa: E402
from vision_rag.colpali import ColPaliEmbedder, write_embedder_record  # noqa: E402
from vision_rag.langchain import page_text  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("queries", nargs="*", default=["total due on the invoice", "chart of the quarterly revenue"])
    parser.add_argument("--pdfs", help="folder of PDFs / scans (PNG, JPEG, TIFF) to index, searched recursively "
                                       "(default: generate two sample PDFs)")
    parser.add_argument("--colpali", help="ColPali checkpoint directory (default: a tiny random one)")
    parser.add_argument("--index", help="index directory (default: a temporary one)")
    parser.add_argument("-k", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="search-scans-"))
    folder = Path(args.pdfs) if args.pdfs else sample_data.write_sample_pdfs(work / "pdfs")[0].parent
    checkpoint = args.colpali or sample_data.write_tiny_colpali(work / "tiny-colpali")
    embedder = ColPaliEmbedder.load(checkpoint)
    index_dir = Path(args.index) if args.index else work / "index"
    print(f"model {embedder.model_id}; indexing {folder} into {index_dir}")

    # The index remembers the model that built it and refuses vectors from another one.
    with Index.open(index_dir, create=True, model_id=embedder.model_id, dim=embedder.dim) as index:
        write_embedder_record(index_dir, embedder)  # so `gemma-ground search --index DIR` loads the same model
        report = index_paths(index, embedder, [folder], progress=False)  # unchanged files are skipped
        for problem in report.files_failed:
            print(f"skipped {problem.path}: {problem.reason}")
        print(f"{len(index)} pages in the index ({len(report.files_indexed)} files added, "
              f"{len(report.files_unchanged)} unchanged)\n")

    with Index.open(index_dir) as index:  # reopened from disk: everything was committed
        for query in args.queries:
            (query_vectors,) = embedder.embed_queries([query], progress=False)
            print(f"query: {query!r}")
            for rank, hit in enumerate(index.search(query_vectors, k=args.k), 1):
                first_line = (page_text(hit.page) or "(no text layer)").splitlines()[0]
                print(f"  {rank}. {hit.score:7.3f} ({hit.normalized_score:.3f})  {Path(hit.page.source_path).name} "
                      f"p.{hit.page.page_number + 1}  page_id={hit.page_id}  {first_line!r}")
        first_document = index.pages()[0].document_id  # the file's resolved path
        (query_vectors,) = embedder.embed_queries([args.queries[0]], progress=False)
        hits = index.search(query_vectors, k=args.k, filter=SearchFilter(document_id=first_document))
        print(f"\nonly {Path(first_document).name}: "
              + ", ".join(f"p.{h.page.page_number + 1} ({h.score:.3f})" for h in hits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
