"""How published head maps agree with each other: context for our own head atlas.

Inputs (public files; the commits are those of the snapshots the table was made from):
- Wu et al.'s retrieval-head scores, `head_score/Mistral-7B-v0.2-hf.json` in
  github.com/nightdessert/Retrieval_Head (`--wu-dir`, default `../shared/niah/official_head_scores`).
- HeadKV's scores, `Important_Head/head_score/<model>_retrieval_heads.json` (Wu's retrieval score)
  and `<model>_retrieval_reasoning_heads.json` (their retrieval-reasoning score, "R2") in
  github.com/FYYFU/HeadKV, for Meta-Llama-3-8B-Instruct and Mistral-7B-Instruct-v0.2.
- DuoAttention's gates, `attn_patterns/<model>/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10/
  full_attention_heads.tsv` in github.com/mit-han-lab/duo-attention, saved in `--published-dir`
  as `<model>_full_attention_heads.tsv` (e.g. `git show HEAD:attn_patterns/... > ...`).
HeadKV's files keep their names and also go in `--published-dir`.

What is computed, pair by pair:
- Wu and HeadKV files give one score per query head ({"layer-head": [per-trial scores]}); a head's
  score is its mean over the listed trials (`DetectionResult.from_published`, `.scores()`).
- DuoAttention gives one gate per KV head (rows = layers, columns = KV heads), clipped to [0, 1]
  as DuoAttention does when it loads them; a few published gates are slightly negative.
- Query-head maps are compared over all query heads. Against DuoAttention, a query-head map is
  first reduced to KV heads: a KV head's score is the maximum over the query heads that read it
  (query head h reads KV head h // (n_heads / n_kv_heads); `kv_head_scores`).
- Spearman's rank correlation (ties get their average rank) over all heads of the pair.
- Top-K overlap |A ∩ B| / K (K = 64), with `compare`'s rule: heads scoring 0 are left out of a
  top K, and ties are broken in layer-head order. DuoAttention's published gates have 82-110 of
  256 at exactly 1, more than K, so that order, not the gates, picks its top K. The next column
  is therefore the overlap expected when each side's ties are broken at random, and the tie
  column says how many heads share the K-th score on each side. "chance" is K / n, the overlap
  expected of two random top-K sets.
- The maps differ in checkpoint as well as method where the last column says so.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from rh_lens.analysis.analyses import compare
from rh_lens.detection.records import DetectionResult
from rh_lens.execution.files import read_json
from rh_lens.interventions.compression import kv_head_scores

HERE = Path(__file__).resolve().parent
WU, HEADKV, DUO = "nightdessert/Retrieval_Head", "FYYFU/HeadKV", "mit-han-lab/duo-attention"
COMMITS = {  # `git log -1 --format=%H` of the snapshots read
    WU: "3ac171a6f71ce7ef1cda57d4215c390fb6ab51f2",
    HEADKV: "0862a0955fe82e9ff611d59541918e02c5def625",
    DUO: "fe93c314ae87306ef6629dc16713250b4718ffe7",
}
DUO_RUN = "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"


def headkv(model: str, score: str) -> tuple[str, str, str]:
    return HEADKV, f"Important_Head/head_score/{model}_{score}_heads.json", model


def duo(model: str) -> tuple[str, str, str]:
    return DUO, f"attn_patterns/{model}/{DUO_RUN}/full_attention_heads.tsv", model


MAPS = {  # name: (repo, path in the repo, checkpoint)
    "Wu Mistral": (WU, "head_score/Mistral-7B-v0.2-hf.json", "Mistral-7B-v0.2 (base)"),
    "HeadKV-Wu Llama": headkv("Meta-Llama-3-8B-Instruct", "retrieval"),
    "HeadKV-R2 Llama": headkv("Meta-Llama-3-8B-Instruct", "retrieval_reasoning"),
    "HeadKV-Wu Mistral": headkv("Mistral-7B-Instruct-v0.2", "retrieval"),
    "HeadKV-R2 Mistral": headkv("Mistral-7B-Instruct-v0.2", "retrieval_reasoning"),
    "Duo Llama": duo("Llama-3-8B-Instruct-Gradient-1048k"),
    "Duo Mistral": duo("Mistral-7B-Instruct-v0.2"),
    "Duo Mistral-v0.3": duo("Mistral-7B-Instruct-v0.3"),
}
PAIRS = [
    ("HeadKV-Wu Llama", "HeadKV-R2 Llama"),
    ("HeadKV-Wu Llama", "Duo Llama"),
    ("HeadKV-R2 Llama", "Duo Llama"),
    ("HeadKV-Wu Mistral", "HeadKV-R2 Mistral"),
    ("HeadKV-Wu Mistral", "Duo Mistral"),
    ("HeadKV-R2 Mistral", "Duo Mistral"),
    ("Wu Mistral", "HeadKV-Wu Mistral"),
    ("Wu Mistral", "HeadKV-R2 Mistral"),
    ("Wu Mistral", "Duo Mistral"),
    ("Duo Mistral", "Duo Mistral-v0.3"),  # same method, next checkpoint
]


def local_file(name: str, args: argparse.Namespace) -> Path:
    repo, path, _ = MAPS[name]
    if repo == WU:
        return args.wu_dir / Path(path).name
    if repo == HEADKV:
        return args.published_dir / Path(path).name
    return args.published_dir / f"{path.split('/')[1]}_full_attention_heads.tsv"


def load_map(name: str, path: Path) -> DetectionResult:
    """A query-head map as it is published, or DuoAttention's gates as a one-trial map of KV heads."""
    if path.suffix == ".json":
        return DetectionResult.from_published(read_json(path), model=name)
    gates = np.clip(np.loadtxt(path, ndmin=2), 0, 1)
    return as_result(torch.from_numpy(gates), name)


def as_result(scores: torch.Tensor, name: str) -> DetectionResult:
    data = {
        f"{layer}-{head}": [float(scores[layer, head])] for layer in range(scores.shape[0]) for head in range(scores.shape[1])
    }
    return DetectionResult.from_published(data, model=name)


def to_kv_heads(result: DetectionResult, n_layers: int, n_kv_heads: int) -> DetectionResult:
    if result.n_layers != n_layers or result.n_heads % n_kv_heads:
        raise SystemExit(
            f"{result.model}: {result.n_layers} x {result.n_heads} query heads do not map onto {n_layers} x {n_kv_heads}"
        )
    return as_result(kv_head_scores(result.scores(), n_kv_heads), result.model)


def tied_at_cut(scores: np.ndarray, k: int) -> np.ndarray:
    return scores == np.sort(scores)[::-1][k - 1]


def in_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Each head's chance of being in the top k when ties are broken at random; heads at 0 never are."""
    at = tied_at_cut(scores, k)
    above = scores > scores[at][0]
    return np.where(scores > 0, above + at * (k - above.sum()) / at.sum(), 0.0)


def git_blob(path: Path) -> str:
    """The file's git object id: `git ls-tree <commit> <path>` gives the same for the same bytes."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wu-dir", type=Path, default=HERE.parents[1] / "shared" / "niah" / "official_head_scores")
    parser.add_argument("--published-dir", type=Path, required=True, help="a directory with the HeadKV and Duo files")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "published_agreement.md")
    args = parser.parse_args(argv)
    k = args.top_k
    files = {name: local_file(name, args) for name in MAPS}
    maps = {name: load_map(name, path) for name, path in files.items() if path.exists()}
    lines = [
        f"| A | B | heads | Spearman | top-{k} overlap | same, random tie order | tied at the {k}th score (A / B) | chance | checkpoints |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name_a, name_b in PAIRS:
        if name_a not in maps or name_b not in maps:
            print(f"skipped {name_a} vs {name_b}: {files[name_a] if name_a not in maps else files[name_b]} not found")
            continue
        a, b = maps[name_a], maps[name_b]
        kv = name_b.startswith("Duo")  # then b is a map of KV heads
        a = to_kv_heads(a, b.n_layers, b.n_heads) if kv else a
        c = compare(a, b, top_k=k)
        sa, sb = np.asarray(c.scores_a), np.asarray(c.scores_b)
        expected = float((in_top_k(sa, k) * in_top_k(sb, k)).sum()) / k
        ties = f"{tied_at_cut(sa, k).sum()} / {tied_at_cut(sb, k).sum()}"
        ck_a, ck_b = MAPS[name_a][2], MAPS[name_b][2]
        spearman = "n/a" if c.spearman is None else f"{c.spearman:.3f}"
        lines.append(
            f"| {name_a} | {name_b} | {len(sa)} {'KV' if kv else 'query'} | {spearman} | {c.top_k_overlap:.3f} | {expected:.3f} "
            f"| {ties} | {k / len(sa):.3f} | {'same' if ck_a == ck_b else f'{ck_a} vs {ck_b}'} |"
        )
    sources = [
        f"- {name}: {repo} `{path}` @ {COMMITS[repo]} (git blob {git_blob(files[name])})"
        for name, (repo, path, _) in MAPS.items()
        if name in maps
    ]
    command = shlex.join(["python", "experiments/published_agreement.py", *argv])
    text = "\n".join([f"Generated by experiments/published_agreement.py: `{command}`", "", *lines, "", "Sources:", *sources])
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
