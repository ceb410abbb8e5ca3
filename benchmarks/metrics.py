"""Benchmark 3: scoring 1,000 generated images against all 60,000 MNIST training images.

- nearest-train SSIM with the prefilter (correlation + L2 top-k, then exact SSIM on the candidates),
  the path every evaluation takes;
- brute-force exact SSIM against every same-class training image on a subset of the queries,
  extrapolated to all of them, and the agreement of the two on that subset;
- the whole evaluation (`harness.science.metrics.Evaluator`: nearest train and test SSIM, train_coverage
  over all 60,000 training images, classifier and evaluator accuracy, diversity, fd_eval).

The queries stand in for a generator's output: 100 held-out real images per class (what a perfect
inversion would produce; the prefilter must be exact on them). The timing does not depend on the
classifiers' weights, so untrained ones are used.

    python benchmarks/metrics.py [--queries 1000] [--brute 20] [--topk 15]
"""
from __future__ import annotations

import time

from common import parser, report


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=1000, help="generated images (a multiple of 10)")
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--brute", type=int, default=20, help="queries compared with every training image")
    p.add_argument("--topk", type=int, default=15)
    args = p.parse_args(argv)

    import torch

    from harness.science.classifiers import EvaluatorCNN, ShallowCNN
    from harness.config import DataConfig, EvalConfig
    from harness.science.data import Split, heldout_set, train_subset
    from harness.science.metrics import Evaluator, nearest_ssim, nearest_ssim_bruteforce, reference_points

    n_q, n_train, n_brute = args.queries, args.train_size, args.brute
    if args.tiny:
        n_q, n_train, n_brute = 50, 2000, 4
    data = DataConfig(dataset="mnist", train_size=n_train)
    train, _ = train_subset(data)
    pool = heldout_set(data, 500)
    keep = torch.cat([(pool.labels == k).nonzero().squeeze(1)[:n_q // 10] for k in range(10)])
    queries = Split(pool.images[keep], pool.labels[keep])

    start = time.perf_counter()
    fast, _ = nearest_ssim(queries, train, args.topk)
    t_fast = time.perf_counter() - start

    sub = torch.linspace(0, len(queries) - 1, n_brute).long()
    sub_q = Split(queries.images[sub], queries.labels[sub])
    start = time.perf_counter()
    exact = nearest_ssim_bruteforce(sub_q, train)
    t_brute_sub = time.perf_counter() - start
    t_brute = t_brute_sub / n_brute * len(queries)
    agree = (fast[sub] - exact).abs()

    cfg = EvalConfig(topk=args.topk)
    start = time.perf_counter()
    refs = reference_points(train, pool, cfg)
    t_refs = time.perf_counter() - start
    torch.manual_seed(0)
    evaluator = Evaluator(cfg, train, pool, ShallowCNN(2, "avg").eval(), EvaluatorCNN().eval(), refs)
    start = time.perf_counter()
    evaluator(queries.images, queries.labels)
    t_eval = time.perf_counter() - start

    pairs_fast = len(queries) * 3 * args.topk
    rows = [
        ["nearest-train SSIM, prefilter top-k", len(queries), n_train, t_fast, "measured"],
        [f"nearest-train SSIM, brute force ({n_brute} queries)", n_brute, n_train, t_brute_sub, "measured"],
        ["nearest-train SSIM, brute force", len(queries), n_train, t_brute, "extrapolated"],
        ["whole evaluation (all metrics, train_coverage)", len(queries), n_train, t_eval, "measured"],
        ["reference points (once per subset, then cached)", "-", n_train, t_refs, "measured"],
    ]
    figures = {"queries": len(queries), "train": n_train, "topk": args.topk, "prefilter_s": t_fast,
               "brute_subset_s": t_brute_sub, "reference_points_s": t_refs, "brute_extrapolated_s": t_brute, "evaluation_s": t_eval,
               "speedup": t_brute / t_fast, "max_abs_diff_vs_brute": agree.max().item(),
               "exact_matches": int((agree < 1e-5).sum()), "checked": n_brute}
    report(f"Metrics: {len(queries):,} generated vs {n_train:,} training images", ["what", "queries", "train images",
           "seconds", ""], rows,
           [f"prefilter vs brute force: {t_brute / t_fast:.0f}x faster; on the {n_brute} queries checked, "
            f"{int((agree < 1e-5).sum())} found exactly the brute-force maximum (largest difference "
            f"{agree.max().item():.4f}). Exact SSIM on at most {pairs_fast:,} pairs (3 prefilters x top-{args.topk} per "
            "query, each distinct pair once)."],
           figures, args.json)


if __name__ == "__main__":
    main()
