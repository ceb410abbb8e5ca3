"""The names of the metrics a trial reports (no torch here: sweep files are checked against
these names before anything heavy is imported). Definitions are in `harness.science.metrics`.

`ssim_nn_train_mean` is measured against all N training images; `ssim_nn_train_side_mean` and
`ssim_nn_test_mean` against the two equal sides (the training side capped to as many images per
class as the held-out side has, when it has fewer): compare those two, as `memorization_gap` does."""

METRIC_NAMES = (
    "ssim_nn_train_mean", "ssim_nn_train_median", "recon_rate", "ssim_nn_train_side_mean", "ssim_nn_test_mean",
    "memorization_gap", "train_coverage", "heldout_coverage", "coverage_gap", "train_coverage_strict",
    "heldout_coverage_strict", "coverage_gap_strict", "train_top10",
    "heldout_top10", "top10_gap", "target_acc", "evaluator_acc", "diversity", "unique_nn_frac", "collapsed",
    "fd_eval", "score",
)
REFERENCE_NAMES = ("ref_heldout_ssim", "ref_classmean_ssim", "ref_blank_ssim", "ref_heldout_diversity")
# logged only where they apply: the generator's fresh-latent sample (with eval.generator_images: bank the
# metrics above are of G(bank_z) and these are the sample's; with sample they repeat diversity, evaluator_acc
# and target_acc), the kkt term's residual over its whole bank (both inverters), and a distillation's targets
SITUATIONAL_NAMES = (
    "sample_diversity", "sample_evaluator_acc", "sample_target_acc", "kkt_residual_bank",
    "distill_matched_frac", "distill_ssim_mean", "distill_matched_after", "distill_steps_done", "distill_seconds",
)
